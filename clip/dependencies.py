"""The error for a setting that needs a package this environment lacks: `logging.wandb`'s wandb, webdataset for
shards, the fsspec backend of a shard URL's protocol (s3fs for s3://). Checked before a run starts, so that
it ends with one line naming what to install rather than a traceback from deep inside the data or logging."""


class MissingDependency(ImportError):
    """A setting asks for a package that is not installed."""
