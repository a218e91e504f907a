"""Finding ops and kernels after fusion, which may have wrapped an op in a
``fused_kernel`` with its prologue or epilogue."""


def contains(kind_label: str, kind: str) -> bool:
    """True if a kernel's kind label (``KernelCost.kind``) is ``kind`` or a
    fused kernel one of whose ops is ``kind``."""
    if kind_label == kind:
        return True
    return kind_label.startswith("fused_kernel[") and kind in kind_label[13:-1].split("+")


def kernels_with(kernels, kind: str) -> list:
    """The ``KernelCost``s that run an op of ``kind``."""
    return [k for k in kernels if contains(k.kind, kind)]


def ops_with(ops, kind: str) -> list:
    """The ops of ``ops`` that are of ``kind`` or fused kernels holding one."""
    return [op for op in ops if op.kind == kind or (
        op.kind == "fused_kernel" and any(o.kind == kind for o in op.regions["body"].ops))]


def ops_of_kind(module, kind: str) -> list:
    """Ops of ``kind`` anywhere in ``module``, regions (loop bodies, fused
    kernels) included, in program order."""
    found = []
    for op in module.ops:
        if op.kind == kind:
            found.append(op)
        for region in op.regions.values():
            found.extend(ops_of_kind(region, kind))
    return found


def inner(op, kind: str):
    """The op of ``kind`` inside ``op`` (``op`` itself if it is one)."""
    if op.kind == kind:
        return op
    (found,) = [o for o in op.regions["body"].ops if o.kind == kind]
    return found


def flat_kinds(ops) -> list[str]:
    """The kinds of ``ops`` with each fused kernel replaced by the kinds of
    its ops (views left out, as in its ``ops`` attribute)."""
    kinds = []
    for op in ops:
        if op.kind == "fused_kernel":
            kinds += [k for k in op.attrs["ops"].split("+") if k]
        else:
            kinds.append(op.kind)
    return kinds
