"""One process of the context-parallel agreement check: `torchrun --nproc_per_node 2 tests/context_parallel_worker.py
OUT.json [--device cuda]`. Each rank runs tiny real configs of Wan and HunyuanVideo on one device (the reference),
then with diffusers' Ulysses context parallelism over every rank, dense and sparsified, and writes the largest
difference per case (rank 0 writes OUT.json). Used by tests/test_context_parallel.py (CPU, gloo) and
tests/test_multigpu.py (2 GPUs, NCCL)."""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

# Tiny configs: 4 heads, so 2 ranks hold 2 heads each (the head offset matters for per-head masks).
WAN = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4,
           text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
HUNYUAN = dict(in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=16, num_layers=1,
               num_single_layers=1, num_refiner_layers=1, text_embed_dim=16, pooled_projection_dim=8,
               rope_axes_dim=(4, 6, 6))


def _wan_inputs(device, dtype):
    return dict(hidden_states=torch.randn(1, 4, 13, 8, 8), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 8, 16))


def _hunyuan_inputs(device, dtype):
    # 8 text tokens, 5 real: rank 0 holds 4 real ones, rank 1 one real and three padding.
    return dict(hidden_states=torch.randn(1, 4, 5, 16, 16), timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 8, 16), encoder_attention_mask=torch.arange(8)[None] < 5,
                pooled_projections=torch.randn(1, 8), guidance=torch.tensor([6000.0]))


def _cases():
    from dit_sparse.patterns import DraftConfig, VditConfig
    from dit_sparse.patterns.vdit import HeadPattern

    per_head = [HeadPattern.diagonal((0, 0, 0)), HeadPattern("dense"), HeadPattern.diagonal((1, 1, 1)),
                HeadPattern.diagonal((2, 0, 0))]
    return {
        "wan": (WAN, _wan_inputs, {
            "dense": None,
            "radial": ("radial", {"block_size": 16}),
            "vdit-per-head": (VditConfig(layer_pattern=[per_head, per_head[::-1]], block_size=16), {}),
            "draft-per-head": (DraftConfig(layer_density=[(0.3, 0.5, 0.7, 1.0), (1.0, 0.7, 0.5, 0.3)]), {}),
        }),
        "hunyuan": (HUNYUAN, _hunyuan_inputs, {
            "dense": None,
            "radial": ("radial", {"block_size": 16}),
        }),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    torch.set_num_threads(1)
    on_cpu = args.device == "cpu"
    dist.init_process_group("gloo" if on_cpu else "nccl")
    rank = dist.get_rank()
    if on_cpu:  # diffusers' enable_parallelism asks the accelerator for a device count; on a CPU there is none
        torch.accelerator.device_count = lambda: 1
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    dtype = getattr(torch, args.dtype)

    import diffusers

    import dit_sparse

    results = {}
    for family, (config, make_inputs, methods) in _cases().items():
        cls = diffusers.WanTransformer3DModel if family == "wan" else diffusers.HunyuanVideoTransformer3DModel
        torch.manual_seed(0)  # the same weights and inputs on every rank
        model = cls(**config).to(device, dtype).eval()
        inputs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in
                  make_inputs(device, dtype).items()}
        reference, parallel = {}, {}
        with torch.no_grad():
            for name, method in methods.items():
                if method is not None:
                    dit_sparse.sparsify(model, method[0], **method[1])
                reference[name] = model(**inputs, return_dict=False)[0]
                dit_sparse.unsparsify(model)
            dit_sparse.enable_context_parallel(model, diffusers.ContextParallelConfig(ulysses_degree=2))
            for name, method in methods.items():
                if method is not None:
                    dit_sparse.sparsify(model, method[0], **method[1])
                    dit_sparse.sparsity_stats(model, reset=True)
                parallel[name] = model(**inputs, return_dict=False)[0]
                density = dit_sparse.sparsity_stats(model)["density"] if method is not None else 1.0
                dit_sparse.unsparsify(model)
                results[f"{family}/{name}"] = {
                    "max_abs_diff": (parallel[name].float() - reference[name].float()).abs().max().item(),
                    "scale": reference[name].float().abs().max().item(),
                    "differs_from_dense": (reference[name].float() - reference["dense"].float()).abs().max().item(),
                    "density": density,
                }
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(args.out, "w") as file:
            json.dump({"ranks": gathered}, file, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Skip the interpreter's teardown: on 2 CPU cores about one run in ten aborted there ("terminate called without
    # an active exception", no Python frame left) after the results were written and the group destroyed, a thread
    # of torch's gloo process group still joinable at exit. The work is done and checked by then.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
