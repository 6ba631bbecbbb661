"""A plain per-task reference implementation of the supermodel: the oracle for the batched one.

It runs every task separately through the backbone graph, node by node, and at each VCN mixes the three options as
standalone modules (`VCN.option_module`) — the paper's definition, with none of the batching tricks."""
import torch

def option_modules(sm):
    "{(vcn key, option, task): module}: the shared ops themselves, copies for task-specific ops and skips."
    return {(k, o, t): v.option_module(o, t) for k, v in sm.vcns.items() for o in range(3) for t in range(len(sm.tasks))}

def reference_forward(sm, x, W, mods=None):
    "Per-task forward of `sm` on `x` ((bs, C, H, W) or (T, bs, C, H, W)) with mixing weights `W` (T, L, 3)."
    mods = mods if mods is not None else option_modules(sm)
    outs = {}
    for t, task in enumerate(sm.tasks):
        env = {sm.graph.inputs[0]: x if x.dim() == 4 else x[t]}
        for n in sm.graph:
            if n.kind == 'input': continue
            if n.name in sm._alias: env[n.name] = env[sm._alias[n.name]]; continue  # bn fused into its conv's VCN
            key = n.name.replace('.', '__')
            if key in sm.vcns:
                v, xin = sm.vcns[key], env[n.parents[0]]
                env[n.name] = sum(W[t, v.index, o] * mods[(key, o, t)](xin) for o in range(3))
            else: env[n.name] = sm.ops[key].fn(*[env[p] for p in n.parents])
        outs[task] = sm.heads[task](env[sm.output])
    return outs

def task_grads(sm, mods):
    "Gradients of the reference's standalone task modules, keyed like the batched parameters' task slices."
    g = {}
    for (k, o, t), m in mods.items():
        if o == 0: continue
        for name, p in m.named_parameters():
            if p.grad is not None: g[(k, o, t, name)] = p.grad
    return g
