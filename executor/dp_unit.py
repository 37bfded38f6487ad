"""One DP unit of executor/dp.py: the flat, padded buffers a group of parameters lives in (parameters, fp32 master,
gradients, this rank's shard and masks), and how one is built from the model's parameters (initial values, the
shard this rank keeps, binding the parameters as views). DataParallel (dp.py) reduces, gathers and frees them."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .comm import Group


@dataclass
class Unit:
    params: list[nn.Parameter]
    offsets: list[int]
    numel: int                          # padded to a multiple of dp
    flat: torch.Tensor                  # full parameters in param_dtype (views of it are the model's parameters)
    grad: torch.Tensor                  # full gradient accumulator (grad_dtype)
    shard_param: torch.Tensor           # the fp32 master the optimizer updates: this rank's shard (zero >= 1) or
                                        # the whole unit; fp32 training: a view of flat (zero <= 2), zero 3 its own
    shard_lowp: torch.Tensor | None     # zero 3, low precision, >1 rank: this rank's shard in param_dtype (gathered)
    shard_grad: torch.Tensor | None     # zero >= 1: the reduced shard (zero 1: a view of grad; 2, 3: its own)
    decay: torch.Tensor                 # bool mask over this rank's shard: weight decay applies
    count: torch.Tensor                 # bool mask over this rank's shard: counted in the global grad norm
    index: int = 0
    ready: int = 0
    launched: bool = False
    gathered: bool = True
    in_backward: bool = False
    pending: list = field(default_factory=list)
    inflight: object | None = None      # zero 3: an issued, not yet waited parameter gather (its work)
    sp_params: list[tuple[int, int]] = field(default_factory=list)   # (offset, numel) of grads to sum over TP


def _free(t: torch.Tensor) -> None:
    t.untyped_storage().resize_(0)


def _alloc(t: torch.Tensor) -> None:
    s = t.untyped_storage()
    need = t.numel() * t.element_size()
    if s.size() != need:
        s.resize_(need)


def _initial(params: list[nn.Parameter], offsets: list[int], lo: int, hi: int, device: torch.device
             ) -> torch.Tensor:
    """Elements [lo, hi) of the unit's flat initial values (fp32; padding zeros), on `device`: a deferred
    parameter's (meta, with `loom_init`) computed from its initialiser for just its elements in the range, a
    materialised one's copied. So a ZeRO-3 rank computes only its shard (plus one vectorised pass of scratch)."""
    out = torch.zeros(hi - lo, dtype=torch.float32, device=device)
    for p, o in zip(params, offsets):
        a, b = max(lo, o), min(hi, o + p.numel())
        if a >= b:
            continue
        init = getattr(p, "loom_init", None)
        if p.is_meta:
            assert init is not None and device.type == "cpu", "a meta parameter without its initialiser"
            init.fill(a - o, b - o, out[a - lo:b - lo].numpy())
        else:
            out[a - lo:b - lo].copy_(p.detach().reshape(-1)[a - o:b - o])
    return out


def decays(p: nn.Parameter) -> bool:
    """Weight decay applies: matrices, unless marked otherwise (norms, biases and positions are not decayed)."""
    return getattr(p, "loom_decay", True) and p.dim() >= 2


def counted(p: nn.Parameter, tp_rank: int) -> bool:
    """Counted in the global gradient norm: replicated over TP, once, on TP rank 0 (Megatron-LM's
    param_is_not_tensor_parallel_duplicate)."""
    return getattr(p, "loom_tp_split", False) or tp_rank == 0


def _mask(params: list[nn.Parameter], offsets: list[int], rng: slice, pred) -> torch.Tensor:
    """bool over the unit's elements `rng`: pred(p) on each parameter's elements, False on the padding."""
    m = torch.zeros(rng.stop - rng.start, dtype=torch.bool)
    for p, o in zip(params, offsets):
        a, b = max(rng.start, o), min(rng.stop, o + p.numel())
        if a < b:
            m[a - rng.start:b - rng.start] = bool(pred(p))
    return m


def _bind(p: nn.Parameter, view: torch.Tensor) -> None:
    """Make parameter p a view of its unit's buffer. A deferred (meta) parameter cannot take `.data` from another
    device type: swap its contents with a Parameter over the view, keeping the object (modules, tied references
    and hooks see the same Parameter) and its attributes (marks)."""
    if not p.is_meta:
        p.data = view
        return
    # `.data =` keeps q's own version counter (nn.Parameter(view) would share the buffer's, and a gather into
    # the buffer would then count as modifying the parameters saved for the backward)
    q = nn.Parameter(torch.empty(0, dtype=view.dtype, device=view.device), requires_grad=p.requires_grad)
    q.data = view
    q.__dict__.update({k: v for k, v in p.__dict__.items() if k != "loom_init"})
    torch.utils.swap_tensors(p, q)


def build_unit(params: list[nn.Parameter], index: int, *, dp: Group, tp_rank: int, zero: int,
               param_dtype: torch.dtype, grad_dtype: torch.dtype, transient_grads: bool,
               device: torch.device | None) -> Unit:
    """Unit `index` over `params` (dp.py's module docstring says what each ZeRO stage keeps). `device`: where the
    unit lives (None: where the parameters are); `transient_grads`: the full gradient buffer exists only while a
    backward fills it (ZeRO-2/3 over >1 rank)."""
    lowp = param_dtype != torch.float32
    n, ways = sum(p.numel() for p in params), dp.size
    padded = -(-n // ways) * ways
    # The values are assembled where the parameters are, or on the host for parameters built deferred (meta
    # tensors carrying their initialiser: model.BuildCtx.params_on_host); the unit lives on the model's
    # device. Under ZeRO-3 only this rank's shard is computed (init_rng.Init.fill, element ranges of each
    # parameter) and sent to the device (the full buffer is a storage-less placeholder, gathered later).
    lazy = any(p.is_meta for p in params)
    src = torch.device("cpu") if lazy else params[0].device
    dev = device or src
    offsets, off, sp = [], 0, []
    for p in params:
        if getattr(p, "loom_sp_grad", False):
            sp.append((off, p.numel()))
        offsets.append(off)
        off += p.numel()
    per = padded // ways
    sharded = zero >= 1 and dp.active
    mine = slice(dp.rank * per, (dp.rank + 1) * per) if sharded else slice(0, padded)
    own = slice(dp.rank * per, (dp.rank + 1) * per)
    if zero == 3 and sharded:                   # only the shard is computed and reaches the device
        master = _initial(params, offsets, own.start, own.stop, src).to(dev)   # fp32 master (fp32: also gathered)
        flat = torch.empty(padded, dtype=param_dtype, device=dev)            # a placeholder, freed below
        shard_lowp = master.to(param_dtype) if lowp else None
    else:
        full = _initial(params, offsets, 0, padded, src)                     # the initial values, fp32
        if lowp:                                # fp32 master of what this rank updates, apart
            master = full[mine].to(dev, copy=True) if sharded else full.to(dev)
            flat = full.to(dev, param_dtype)    # the parameters: the rounded master
        else:                                   # fp32: the parameters are the master
            flat = full.to(dev)
            master = flat[mine]
        shard_lowp = None
        del full
    for p, o in zip(params, offsets):
        _bind(p, flat[o:o + p.numel()].view(p.shape))
    if zero == 3 and sharded:
        _free(flat)                             # gathered before use (_issue allocates it): one unit's
                                                # placeholder at a time is all the device sees of it
    grad = torch.empty(padded, dtype=grad_dtype, device=dev)
    if zero == 0:
        shard_grad = None
    elif transient_grads:                       # the accumulator; the full buffer exists only while filled
        shard_grad = torch.zeros(per, dtype=grad_dtype, device=dev)
        _free(grad)
    else:                                       # zero 1 (or one rank): reduced in place, a view
        shard_grad = grad[dp.rank * per:(dp.rank + 1) * per]
    if not transient_grads:
        grad.zero_()
    decay = _mask(params, offsets, own, decays)                           # over this rank's shard; padding:
    count = _mask(params, offsets, own, lambda p: counted(p, tp_rank))     # False
    return Unit(params, offsets, padded, flat, grad, master, shard_lowp, shard_grad,
                decay.to(dev), count.to(dev), index, sp_params=sp)
