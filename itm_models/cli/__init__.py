"""Command-line entry points: :mod:`.train` (``itm-train``), :mod:`.eval` (``itm-eval``), :mod:`.demo`
(``itm-demo``). Each is imported only when run."""
