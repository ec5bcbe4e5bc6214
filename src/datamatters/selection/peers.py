"""Selection peers that are not a per-batch rule of the selective module: InfoBatch (a per-epoch sampler plus loss
weights) and Selective Backprop (a stateful probabilistic rule). ``build_peer`` makes the module (and, for InfoBatch,
installs the sampler on the datamodule) from plain options, so the train job only names the method."""
from __future__ import annotations

from datamatters.selection.infobatch import InfoBatchModule, InfoBatchState, infobatch_loader
from datamatters.selection.selective_backprop import SelectiveBackpropModule

PEERS = ("infobatch", "selective_backprop")


def build_peer(method: str, options: dict, dm, num_epochs: int, seed: int, model, optimizer=None, scheduler=None,
               **module_kw):
    """``options``: ``selection.infobatch`` ({prune_ratio, delta}) or ``selection.selective_backprop``
    ({beta, history, prime_epochs}). ``module_kw``: the selective module's own options (corrupted, num_classes...)."""
    options = dict(options or {})
    if method == "infobatch":
        state = InfoBatchState(dm.split_indices(dm.fit_split), num_epochs, **options)
        dm.train_loader_factory = lambda ds: infobatch_loader(ds, state, dm.batch_size, seed, dm.num_workers,
                                                              dm.pin_memory)
        return InfoBatchModule(model, optimizer, scheduler, state=state, seed=seed, **module_kw)
    if method == "selective_backprop":
        return SelectiveBackpropModule(model, optimizer, scheduler, seed=seed, **options, **module_kw)
    raise ValueError(f"not a selection peer: {method!r}; peers are {PEERS}")
