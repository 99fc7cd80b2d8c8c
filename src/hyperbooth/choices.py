"""The names the command line offers, importable without torch (so `--help` answers at once)."""

METHODS = ("dreambooth", "lora", "lidb", "textual-inversion", "custom-diffusion")
NEW_WORD_METHODS = ("textual-inversion", "custom-diffusion")  # they need a word not yet known
PRECISIONS = ("no", "bf16", "fp16", "auto")  # auto: training.resolve_precision
# diffusers.optimization's schedules that need nothing but warm-up and total steps.
LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)
EXPORT_FORMATS = ("diffusers", "kohya")
