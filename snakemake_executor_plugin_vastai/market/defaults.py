"""What the plugin asks the marketplace for when the user sets nothing.

Why here, below the options: the offer search, the no-offer diagnosis and the note on what
the defaults leave out must tell a default from a choice without knowing Snakemake's option
classes; ``settings`` takes each option's default (and its help's "Default:") from here."""

DEFAULT_API_URL = "https://console.vast.ai"
DEFAULT_IMAGE = "vastai/pytorch:@vastai-automatic-tag"
DEFAULT_DISK_GB = 40
DEFAULT_RELIABILITY = 0.98
DEFAULT_ORDER = "dph_total"
