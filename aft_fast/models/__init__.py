"""Models: below train/ and eval/, above data/ and the loss API.

attention  how each layout reaches a Hugging Face decoder's attention (kernel choice, masks)
forward    forward_hidden, segment_logprobs and AFTModel (the fused loss inside the module's forward)
loading    Hugging Face folders: the embedded tiny Llama, checks, replica / ZeRO-3 loading, atomic saving
"""
