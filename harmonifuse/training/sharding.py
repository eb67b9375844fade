"""How the trainer's processes share the model: one process, DDP (replicas), or FSDP (shards).

``train.parallel`` picks a :class:`Parallel` strategy (:func:`make_parallel`); the trainer steps
through ``strategy.wrap(model)`` and asks the strategy whatever depends on the choice: gradient
sync across micro-batches, the full trained weights and optimiser state for rank 0 to write (and
loading them back), and how the model's parts are reached outside its ``forward`` (evaluation).

Checkpoints are the same under every strategy: the trained parameters as full tensors and the
optimiser state as ``torch.optim.Optimizer.state_dict()`` writes it (integer keys), so a run written
under fsdp resumes under ddp or on one process, and the other way round.

FSDP (``torch.distributed.fsdp.fully_shard``, FSDP2) shards like SLAM-LLM and torchtune: each LLM
decoder layer is one unit, gathered for its own forward and backward only, then the root (the
whole HarmoniFuse: embeddings, LM head, fusion, gate, projector, CTC, a trainable encoder) is one
more. No ``MixedPrecisionPolicy``: the frozen weights are already stored in their compute dtype
(``model.llm.frozen_dtype``, bf16 on GPUs; ``store_frozen_linears_in`` under autocast), so they are
gathered in bf16 (a unit mixing dtypes is gathered as bytes), while the float32 adapters keep float32
masters and float32 gradient reduction, and autocast casts per matmul exactly as under DDP.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from harmonifuse.evaluation.evaluate import ALONE, Share

PARALLEL_CHOICES = ("ddp", "fsdp")


class Parallel:
    """One process: the model as it is."""

    name = "single"
    evaluates_on_every_rank = False
    """Whether every rank takes part in evaluation (ddp: each its share; fsdp: a sharded model's forward is
    a collective)."""

    def wrap(self, model: nn.Module) -> nn.Module:
        """What training steps call; may change ``model``'s parameters (build optimisers afterwards)."""
        return model

    def no_sync(self, module: nn.Module) -> contextlib.AbstractContextManager:
        """Accumulate gradients locally (a micro-batch that is not the step's last)."""
        return contextlib.nullcontext()

    def trained_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trained parameters as full tensors on rank 0 (a collective under fsdp: call on every rank)."""
        return model.trained_state_dict()

    def load_trained(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Copy full trained tensors (every rank holds them) into the model's parameters."""
        own = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in state.items():
                own[name].copy_(tensor)

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """``optimizer.state_dict()`` with full tensors on rank 0 (a collective under fsdp)."""
        return optimizer.state_dict()

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)

    @contextlib.contextmanager
    def evaluation(self, model: nn.Module) -> Iterator[None]:
        """Inside: the model's parts can be called directly (``analyze_hidden``, the CTC), not only ``forward``."""
        yield

    def evaluation_share(self) -> Share:
        """Which part of an evaluation this rank answers (:class:`~harmonifuse.evaluation.evaluate.Share`)."""
        return ALONE


class DDPParallel(Parallel):
    """DistributedDataParallel: a full replica per rank, gradients all-reduced. Evaluation is split
    over the ranks (each scores its share of the batches on its own replica, the answers gathered):
    every rank busy, none waiting in a collective for the whole scoring."""

    name = "ddp"
    evaluates_on_every_rank = True

    def __init__(self, device: torch.device, *, unused_parameters: bool) -> None:
        self.device, self.unused_parameters = device, unused_parameters

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None  # None: the CPU
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=self.unused_parameters)

    def no_sync(self, module: nn.Module) -> contextlib.AbstractContextManager:
        return module.no_sync()

    def evaluation_share(self) -> Share:
        return Share(dist.get_rank(), dist.get_world_size())


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the LLM's decoder layers: the classes its transformers model names in
    ``_no_split_modules`` (what accelerate and SLAM-LLM wrap). Raises ValueError when it names none."""
    base = model.llm.model
    base = base.get_base_model() if hasattr(base, "get_base_model") else base  # under peft's wrapper
    classes = set(getattr(base, "_no_split_modules", None) or [])
    layers = [(f"llm.model.{name}" if name else "llm.model", module)
              for name, module in model.llm.model.named_modules() if type(module).__name__ in classes]
    if not layers:
        raise ValueError(f"train.parallel fsdp: cannot find the decoder layers of {type(base).__name__}: its "
                         "transformers class names none in _no_split_modules; use train.parallel: ddp with this LLM")
    return layers


def fsdp_plan(model: nn.Module) -> dict[str, list[str]]:
    """What :meth:`FSDPParallel.wrap` does to ``model`` (works on a meta or tiny model, no process group):
    ``{"units": [decoder layer names..., "" (the root)], "replicated": [frozen encoder parameter names]}``.
    Raises ValueError for a model FSDP2 cannot shard (no decoder layers found, a trained scalar)."""
    scalars = [name for name, p in model.named_parameters() if p.requires_grad and p.dim() == 0]
    if scalars:  # fully_shard splits every parameter along its first dimension
        raise ValueError(f"train.parallel fsdp: FSDP2 cannot shard a scalar parameter, and {', '.join(scalars)} "
                         "is one that trains (model.ctc.learn_scale: true); set "
                         "model.ctc.learn_scale: false or use train.parallel: ddp")
    units = [name for name, _ in decoder_layers(model)] + [""]
    return {"units": units, "replicated": _replicated_params(model)[0]}


def _replicated_params(model: nn.Module) -> tuple[list[str], set[nn.Parameter]]:
    """A frozen encoder stays whole on every rank: it has no gradients to reduce, so a replica costs no
    traffic, whereas sharding it would gather it at every step (and with a feature cache it is not run
    in training at all). A trainable encoder is sharded with the root: its gradients must be reduced."""
    params = [(f"encoder.{n}", p) for n, p in model.encoder.named_parameters()]
    if any(p.requires_grad for _, p in params):
        return [], set()
    return [n for n, _ in params], {p for _, p in params}


class FSDPParallel(Parallel):
    """FSDP2: parameters, gradients and optimiser state sharded over the ranks (see the module docstring).

    Dev evaluation runs on every rank in step, on the same utterances: a sharded layer's forward is a
    collective, and gathering the whole model for rank 0 alone would need the memory FSDP is there to
    spare. Same inputs and the same gathered weights give every rank the same decoding in principle;
    but numeric differences (kernels, another kind of GPU) can end one rank's search sooner, so the
    LLM decodes in lock step (``SpeechLLM.lockstep``): a rank that has finished runs idle forwards
    until every rank has.
    """

    name = "fsdp"
    evaluates_on_every_rank = True

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fsdp_plan(model)  # refuses what cannot be sharded, with the config field to change
        mesh = init_device_mesh(self.device.type, (dist.get_world_size(),))
        for _, layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        # the root is gathered for the whole step (the embeddings serve the CTC and the token layout
        # before and after the decoder layers): resharding it after the forward would only gather it again
        fully_shard(model, mesh=mesh, reshard_after_forward=False, ignored_params=_replicated_params(model)[1])
        return model

    @contextlib.contextmanager
    def no_sync(self, module: nn.Module) -> Iterator[None]:
        module.set_requires_gradient_sync(False)  # applies to every unit below the root too
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)

    def trained_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        names = {name for name, p in model.named_parameters() if p.requires_grad}
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                    ignore_frozen_params=True))
        return {name: tensor for name, tensor in full.items() if name in names}  # rank 0; {} on the others

    def load_trained(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        names = {name for name, p in model.named_parameters() if p.requires_grad}
        if set(state) != names:  # strict=False below (the frozen weights are not in it) would let this pass
            raise ValueError(f"the checkpoint's trained weights do not match this model: missing "
                             f"{sorted(names - set(state))[:5]}, unexpected {sorted(set(state) - names)[:5]}; "
                             "resume with the run's own config")
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        if not optimizer.state:  # nothing to gather; and DCP would initialise the state with a step of lr 0
            return optimizer.state_dict()
        by_name = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                      cpu_offload=True))
        if not by_name:  # ranks other than 0 receive nothing
            return {}
        return _by_index(by_name, optimizer, model)

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if not state["state"]:
            optimizer.load_state_dict(state)  # hyperparameters only: no tensor to shard
            return
        set_optimizer_state_dict(model, optimizer, _by_name(state, optimizer, model),
                                 options=StateDictOptions(full_state_dict=True))

    @contextlib.contextmanager
    def evaluation(self, model: nn.Module) -> Iterator[None]:
        # evaluation calls the parts (fusion, gate, projector, embeddings) directly, not through
        # forward: gather the root's parameters for its duration; the decoder layers gather themselves,
        # as many times on every rank (lock step)
        model.unshard()
        model.llm.lockstep = True
        try:
            yield
        finally:
            model.llm.lockstep = False
            model.reshard()


def _names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[list[str]]:
    """Parameter names per parameter group of ``optimizer``, in its order."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [[name_of[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def _by_index(state: dict[str, Any], optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """DCP's optimiser state (keyed by parameter name) -> ``Optimizer.state_dict()``'s (by position)."""
    groups, index = [], {}
    for group, names in zip(state["param_groups"], _names(optimizer, model)):
        start = len(index)
        index.update((name, start + i) for i, name in enumerate(names))
        groups.append({**group, "params": list(range(start, start + len(names)))})
    return {"state": {index[name]: value for name, value in state["state"].items()}, "param_groups": groups}


def _by_name(state: dict[str, Any], optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """``Optimizer.state_dict()``'s layout (by position) -> DCP's (by parameter name)."""
    groups, name = [], {}
    for group, names in zip(state["param_groups"], _names(optimizer, model)):
        if len(group["params"]) != len(names):
            raise ValueError(f"the checkpoint's optimiser group {group.get('name', '?')!r} has {len(group['params'])} "
                             f"parameters, this model's {len(names)}: resume with the run's own config")
        name.update(zip(group["params"], names))
        groups.append({**group, "params": names})
    return {"state": {name[i]: value for i, value in state["state"].items()}, "param_groups": groups}


def make_parallel(kind: str, world_size: int, device: torch.device, *, unused_parameters: bool) -> Parallel:
    """The strategy for ``train.parallel`` (``kind``) on ``world_size`` processes; one process needs none.
    ``unused_parameters``: some step leaves trained parameters out of its graph (DDP must then look for them)."""
    if kind not in PARALLEL_CHOICES:
        raise ValueError(f"train.parallel must be one of {', '.join(PARALLEL_CHOICES)}, got {kind!r}")
    if world_size == 1:
        return Parallel()
    if kind == "fsdp":
        return FSDPParallel(device)
    return DDPParallel(device, unused_parameters=unused_parameters)
