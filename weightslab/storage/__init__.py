"""The storage layer: a root's files, as bytes and paths. Nothing here imports torch.

Tensors reach this layer as blobs (raw bytes with a dtype *name* and a shape: see
:mod:`weightslab.tensors`, the one bridge), so that the command line, garbage collection, verification
and remote uploads work on a root without torch, and so that every promise about files is kept in
one place: atomic and durable writes (:mod:`.atomic`), content-addressed verified blobs in packs
(:mod:`.store`, :mod:`.encoding`), the manifest that commits a checkpoint (:mod:`.manifest`),
experiment records and names (:mod:`.experiment`, :mod:`.names`), the directories a person sees
(:mod:`.layout`), a root and its remote copy (:mod:`.root`, :mod:`.remote`), the record of a
distributed job's shard files (:mod:`.shardfiles`), garbage collection (:mod:`.garbage`), and
:class:`~weightslab.storage.manager.CheckpointManager`, which joins them for one root.
"""
