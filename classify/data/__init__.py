"""Data: datasets over the manifest, person-level splits, the transforms (one factory, a `train` switch), synthetic masks."""
