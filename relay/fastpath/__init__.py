"""The eBPF fast path from userspace: map layouts (mirrors of bpf/structs.h), reasons
(mirror of bpf/reasons.h), the loader/attacher and the controller that keeps the maps.

Kernel side: bpf/fastpath_ingress.c, bpf/fastpath_egress.c and the headers beside them.
"""
