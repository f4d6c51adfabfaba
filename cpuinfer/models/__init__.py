"""One module per architecture family; each provides ``Config``, ``Weights``, ``State`` and
``forward`` (llama2.c style) plus a ``Family`` object the runtime drives."""
