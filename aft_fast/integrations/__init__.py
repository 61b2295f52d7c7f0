"""Other trainers on aft-fast's operator: `aft_fast.integrations.trl` (TRL's fused-LM-head contract, and
the AFT trainer) and `aft_fast.integrations.hf` (the AFT trainer on the Hugging Face Trainer alone).

Both need the optional dependencies: ``pip install "aft-fast[trl]"``. Nothing is imported here, so that
``import aft_fast`` never needs them.
"""
