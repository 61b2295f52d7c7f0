"""Names shared by every layer: the loss modes, the backends, the ignore index."""

IGNORE_INDEX = -100

# Modes of DESIGN.md section 2. "vft" is maximum likelihood on reference chains alone.
BASE_MODES = ("align", "dcl", "bcl", "dpo", "rrhf", "pro")
MODES = ("vft", "align", "dcl", "bcl", "dpo", "rrhf", "pro", "dpo+bc", "rrhf+bc", "pro+bc")
BACKENDS = ("auto", "triton", "cpp", "torch")
