"""The tiny model's training script on toy sizes (CPU): it resumes exactly, exports a folder WanPipeline loads, and
trains with the flow convention and text embeddings the pipeline uses; the loader's errors."""

import dataclasses
import json
import os

import pytest
import torch
from diffusers import WanPipeline
from dit_sparse.pipelines import tiny
from dit_sparse.pipelines.tiny import train as tt

SMOKE_MODEL, _ = tt.PRESETS["smoke"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _train(checkpoint, *extra):
    return tt.main(["--checkpoint", str(checkpoint), "--device", "cpu", "--minutes", "5", *extra])


def test_a_run_resumes_where_it_stopped_and_exports_a_loadable_pipeline(tmp_path, capsys):
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    assert _train(checkpoint, "--preset", "smoke", "--chunk-steps", "4") == 0  # 2 VAE steps, stats, 2 transformer
    first = torch.load(checkpoint, weights_only=False)
    assert (first["vae_step"], first["dit_step"]) == (2, 2)
    export = ["--export", str(tmp_path / "model"), "--score-prompts", "1", "--score-steps", "2"]
    assert _train(checkpoint, "--dit-steps", "4", *export) == 0
    second = torch.load(checkpoint, weights_only=False)
    assert (second["vae_step"], second["dit_step"]) == (2, 4)
    printed = capsys.readouterr().out
    assert "resumed" in printed and "caption following: " in printed
    assert second["history"][: len(first["history"])] == first["history"]  # appended, not restarted
    losses = [(e["phase"], e["step"]) for e in second["history"] if "loss" in e]
    assert losses == [("vae", 1), ("vae", 2), ("dit", 1), ("dit", 2), ("dit", 3), ("dit", 4)]
    assert any(e.get("changed") == {"dit_steps": 4} for e in second["history"])

    folder = tmp_path / "model"
    card = (folder / "README.md").read_text()
    for words in ("## Data", "## Config", "## Training", "## Caption following", "/ 1** prompts followed"):
        assert words in card
    assert "- dit step 2: dit_steps=4" in card  # the flag change between the chunks
    assert "trained on cpu, torch" in card and "In the last chunk" not in card and [e["step"] for e in second["history"] if "chunk" in e] == [0, 2]
    assert not list(folder.rglob("*.bin")) and len(list(folder.rglob("*.safetensors"))) == 3
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    assert vae_config["latents_mean"] == second["vae_config"]["latents_mean"] != [0.0] * SMOKE_MODEL.latent_channels

    pipe = tiny.load(folder=folder)  # WanPipeline.from_pretrained
    assert torch.equal(pipe.transformer.proj_out.weight, second["ema"][-2 - len(list(pipe.text_encoder.parameters()))])
    video = pipe(
        "a red circle moves right on a blue background", num_frames=SMOKE_MODEL.frames, height=SMOKE_MODEL.height,
        width=SMOKE_MODEL.width, num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="np",
    ).frames[0]  # fmt: skip
    assert video.shape == (SMOKE_MODEL.frames, SMOKE_MODEL.height, SMOKE_MODEL.width, 3)


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    """Same data, noise and updates. Equal to rounding only: a resume re-encodes the transformer's pool of latents
    in other batch groupings than they were first encoded in, which moves the last bits."""
    assert _train(tmp_path / "once.pt", "--preset", "smoke") == 0
    assert (
        _train(tmp_path / "twice.pt", "--preset", "smoke", "--chunk-steps", "3") == 0
    )  # stops inside the transformer phase
    assert _train(tmp_path / "twice.pt") == 0
    once, twice = (torch.load(tmp_path / name, weights_only=False) for name in ("once.pt", "twice.pt"))
    assert (once["vae_step"], once["dit_step"], once["next_index"]) == (
        twice["vae_step"],
        twice["dit_step"],
        twice["next_index"],
    )
    for key, value in once["vae"].items():
        assert torch.equal(value, twice["vae"][key]), key  # the VAE phase ended before the interruption
    for name in ("transformer", "text_encoder"):
        for key, value in once[name].items():
            assert torch.allclose(value, twice[name][key], rtol=1e-4, atol=1e-5), (name, key)
    losses = [[e["loss"] for e in run["history"] if "loss" in e] for run in (once, twice)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_a_compiled_transformer_trains_as_the_eager_one_and_saves_the_same_keys(tmp_path):
    """`--compile` changes how the transformer's forward runs, not what it computes: same losses and weights to
    rounding, and a checkpoint with the plain module's keys (no torch.compile wrapper prefix)."""
    from torch._dynamo.utils import counters

    assert _train(tmp_path / "eager.pt", "--preset", "smoke") == 0
    counters.clear()
    assert _train(tmp_path / "compiled.pt", "--preset", "smoke", "--compile") == 0
    assert counters["stats"]["unique_graphs"] >= 1  # the forward did go through dynamo
    eager, compiled = (torch.load(tmp_path / name, weights_only=False) for name in ("eager.pt", "compiled.pt"))
    assert eager["transformer"].keys() == compiled["transformer"].keys()
    for key, value in eager["transformer"].items():
        assert torch.allclose(value, compiled["transformer"][key], rtol=1e-3, atol=1e-5), key
    losses = [[e["loss"] for e in run["history"] if e.get("phase") == "dit" and "loss" in e] for run in (eager, compiled)]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_the_vae_phase_ends_at_its_time_budget_and_records_the_step(tmp_path):
    assert _train(tmp_path / "c.pt", "--preset", "smoke", "--vae-steps", "50", "--vae-max-minutes", "1e-6") == 0
    state = torch.load(tmp_path / "c.pt", weights_only=False)
    assert state["vae_step"] == state["train_config"]["vae_steps"] == 1 and state["dit_step"] == 3
    assert any(e.get("changed") == {"vae_steps": 1} for e in state["history"])


def test_vae_crops_are_stride_aligned_windows_of_every_frame_and_half_follow_the_shape():
    config = tt.ModelConfig(frames=9, height=64, width=64, latent_channels=4, vae_base_dim=4, vae_decoder_base_dim=4,
                            vae_dim_mult=(1, 1, 1, 1))  # fmt: skip
    trainer = tt.Trainer(config, tt.PRESETS["smoke"][1], torch.device("cpu"), seed=0)
    indices = list(range(64))
    videos, _ = trainer.render(indices)  # (B, 3, T, 64, 64)
    crops = trainer.crop(videos, indices, 32)
    assert crops.shape == (64, 3, 9, 32, 32)
    near = 0
    for video, crop, index in zip(videos, crops, indices):
        found = [(top, left) for top in range(0, 33) for left in range(0, 33)
                 if torch.equal(video[:, :, top : top + 32, left : left + 32], crop)]  # fmt: skip
        aligned = [(top, left) for top, left in found if top % 8 == 0 and left % 8 == 0]
        assert aligned, found  # (a crop of a plain background matches elsewhere too)
        x, y = tt.video_params(config.data_seed, index).centres(9, 64, 64)[4]
        (top, left), unique = aligned[0], len(aligned) == 1
        near += unique and left + 4 <= x <= left + 28 and top + 4 <= y <= top + 28
    assert near >= 24  # every crop around the path (about half) holds the centre; uniform crops: ~1 in 7
    assert torch.equal(trainer.crop(videos, indices, 0), videos) and torch.equal(trainer.crop(videos, indices, 64), videos)


def test_the_vae_starts_with_a_unit_gain_signal_path_zero_residual_branches_and_a_small_posterior_variance():
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanResidualBlock

    vae = tt.build_components(tt.ModelConfig(frames=9, height=32, width=32))["vae"]  # the shipped VAE's dims
    blocks = [m for m in vae.modules() if isinstance(m, WanResidualBlock)]
    assert blocks and not any(block.conv2.weight.any() or block.conv2.bias.any() for block in blocks)
    z = vae.config.z_dim
    assert torch.equal(vae.post_quant_conv.weight.flatten(1), torch.eye(z))
    assert torch.equal(vae.quant_conv.weight.flatten(1), torch.eye(2 * z))
    assert torch.all(vae.quant_conv.bias[:z] == 0) and torch.all(vae.quant_conv.bias[z:] == -6.0)
    weight = vae.encoder.conv_in.weight
    assert weight.std().item() == pytest.approx(weight[0].numel() ** -0.5, rel=0.2)  # not PyTorch's 1 / sqrt(3 fan_in)
    plain = torch.tensor([[1.0, -1.0, -1.0], [-1.0, -1.0, 1.0]]).view(2, 3, 1, 1, 1).expand(2, 3, 9, 32, 32)
    with torch.no_grad():
        out = tt.vae_decode(vae, tt.vae_encode(vae, plain).mode())
    means = out.mean(dim=(2, 3, 4))
    assert (means[0] - means[1]).abs().max() > 0.05  # a red and a blue video decode differently from the start


def test_two_chunk_vae_encode_and_unclamped_decode_equal_diffusers_and_reach_every_weight():
    vae = tt.build_components(SMOKE_MODEL)["vae"]
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        for param in vae.parameters():  # away from the init (zeroed branches would make the check trivial)
            param.add_(0.2 * torch.randn_like(param))
    videos = torch.rand(2, 3, 9, 32, 32, generator=torch.Generator().manual_seed(0)) * 2.0 - 1.0
    posterior, reference = tt.vae_encode(vae, videos), vae.encode(videos).latent_dist
    assert torch.allclose(posterior.mean, reference.mean, atol=1e-5)
    assert torch.allclose(posterior.logvar, reference.logvar, atol=1e-5)
    decoded = tt.vae_decode(vae, reference.mode())
    assert torch.allclose(decoded.clamp(-1.0, 1.0), vae.decode(reference.mode()).sample, atol=1e-5)
    assert torch.equal(tt.vae_decode(vae, reference.mode(), clamp=True), decoded.clamp(-1.0, 1.0))
    (decoded - videos).abs().mean().backward()
    assert all(param.grad is not None and param.grad.any() for param in vae.parameters())  # time convs included


def test_a_checkpoint_of_another_preset_is_refused(tmp_path):
    assert _train(tmp_path / "c.pt", "--preset", "smoke", "--chunk-steps", "1") == 0
    with pytest.raises(ValueError, match="not of preset 'default'"):
        _train(tmp_path / "c.pt", "--preset", "default")


def test_the_flow_target_is_what_the_pipeline_scheduler_integrates():
    """With the velocity that `flow_matching_inputs` trains towards for a known x0, WanPipeline's UniPC sampler lands
    on x0: the timestep scale, the sign of the target and the noise interpolation all match the pipeline."""
    components = tt.build_components(SMOKE_MODEL)
    pipe = WanPipeline(**components)
    x0 = torch.randn((1, *SMOKE_MODEL.latent_shape), generator=torch.Generator().manual_seed(1))

    def oracle(hidden_states, timestep, **kwargs):
        # The scheduler's exact sigma (the timestep it passes is 1000 sigma rounded down to an integer).
        sigma = pipe.scheduler.sigmas[pipe.scheduler.step_index or 0].expand(hidden_states.shape[0]).float()
        # flow_matching_inputs is linear in the noise: recover it from the noisy input, then take its target.
        s = sigma.view(-1, 1, 1, 1, 1)
        noise = (hidden_states - (1.0 - s) * x0) / s
        noisy, training_timestep, target = tt.flow_matching_inputs(x0, noise, sigma)
        assert torch.allclose(noisy, hidden_states, atol=1e-5)
        assert torch.all((training_timestep - timestep.float() >= 0) & (training_timestep - timestep.float() < 1))
        return (target,)

    pipe.transformer.forward = oracle
    latents = pipe(
        "a red circle moves right on a blue background", num_frames=SMOKE_MODEL.frames, height=SMOKE_MODEL.height,
        width=SMOKE_MODEL.width, num_inference_steps=6, guidance_scale=1.0, output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).frames  # fmt: skip
    assert torch.allclose(latents, x0, atol=1e-4)


def test_training_text_embeddings_are_the_pipelines_prompt_embeddings():
    components = tt.build_components(SMOKE_MODEL)
    pipe = WanPipeline(**components)
    captions = [
        "a red circle moves right on a blue background",
        "",
        "a black square moves up on a white to gray vertical gradient",
    ]
    with torch.no_grad():
        ours = tt.encode_text(pipe.tokenizer, pipe.text_encoder.eval(), captions, "cpu")
        theirs = pipe.encode_prompt(  # the length WanPipeline.__call__ asks for by default
            captions, do_classifier_free_guidance=False, max_sequence_length=tt.TEXT_LEN, device="cpu"
        )[0]
    assert ours.shape == theirs.shape == (3, tt.TEXT_LEN, SMOKE_MODEL.text_dim)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_the_default_model_has_2000_video_tokens_and_fits_in_30_mb():
    config, _ = tt.PRESETS["default"]
    assert (config.frames, config.height, config.width) == (81, 160, 160) and config.video_tokens == 2100 >= 2000
    components = tt.build_components(config)
    parameters = sum(tt.parameter_count(components[name]) for name in ("transformer", "vae", "text_encoder"))
    assert parameters * 4 < 28 * 2**20  # float32 safetensors, with room for the configs, tokenizer and card


def test_tiny_load_says_how_to_make_the_model_when_the_folder_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="tiny.train"):
        tiny.load(folder=tmp_path / "nowhere")
    with pytest.raises(TypeError, match="torch.dtype"):
        tiny.load(dtype="float32", folder=tmp_path)
    assert tiny.available() == os.path.isfile(os.path.join(tiny.MODEL_DIR, "model_index.json"))


def test_a_compact_checkpoint_resumes_from_the_ema_with_a_fresh_optimiser_and_a_new_warmup(tmp_path):
    full, compact = tmp_path / "full.pt", tmp_path / "compact.pt"
    assert _train(full, "--preset", "smoke", "--chunk-steps", "4", "--compact", str(compact)) == 0  # dit step 2
    saved, small = (torch.load(path, weights_only=False) for path in (full, compact))
    assert small["compact"] and small["transformer"] is small["dit_optimizer"] is None
    assert all(torch.equal(a, b) for a, b in zip(saved["ema"], small["ema"])) and small["dit_step"] == 2
    assert compact.stat().st_size < full.stat().st_size
    raw = list(saved["transformer"].values()) + list(saved["text_encoder"].values())
    assert any(not torch.equal(a, b) for a, b in zip(raw, saved["ema"]))  # so restarting from the EMA is visible

    assert _train(compact, "--chunk-steps", "1", "--lr", "1e-3") == 0  # resumed from the compact file, written full
    resumed = torch.load(compact, weights_only=False)
    assert not resumed["compact"] and resumed["dit_step"] == 3 and resumed["warmup_start"] == 2
    groups = resumed["dit_optimizer"]["param_groups"]
    assert groups[0]["lr"] == pytest.approx(1e-3 / 2)  # warmup step 1 of the smoke preset's 2, counted anew
    assert all(state["step"] == 1 for state in resumed["dit_optimizer"]["state"].values())  # a fresh Adam
    assert any(e.get("resumed") for e in resumed["history"])


def test_a_compact_checkpoint_of_an_unfinished_vae_phase_is_refused(tmp_path):
    with pytest.raises(ValueError, match="VAE phase finished"):
        _train(tmp_path / "c.pt", "--preset", "smoke", "--chunk-steps", "1", "--compact", str(tmp_path / "s.pt"))
    assert (tmp_path / "c.pt").exists() and not (tmp_path / "s.pt").exists()  # the full checkpoint was kept


def test_caption_sensitivity_is_flat_for_a_transformer_blind_to_text_and_not_for_one_that_reads_it():
    components = tt.build_components(SMOKE_MODEL)
    pipe = WanPipeline(**components)
    torch.nn.init.normal_(pipe.transformer.proj_out.weight, std=0.5)  # not the zero velocity of a fresh model
    reading = tt.caption_sensitivity(pipe, SMOKE_MODEL, n=4, sigmas=(0.7,))
    assert set(reading) == {"true", "opposite direction", "perpendicular direction", "other colour", "no caption"}
    assert reading["true"] != reading["opposite direction"] and reading["true"] != reading["other colour"]
    for block in pipe.transformer.blocks:  # cross-attention off: the text cannot reach the output
        torch.nn.init.zeros_(block.attn2.to_out[0].weight)
        torch.nn.init.zeros_(block.attn2.to_out[0].bias)
    blind = tt.caption_sensitivity(pipe, SMOKE_MODEL, n=4, sigmas=(0.7,))
    assert len(set(blind.values())) == 1


def test_latent_shape_masks_mark_every_cell_and_frame_group_the_shape_touches():
    generator = torch.Generator().manual_seed(0)
    alpha = torch.rand(2, 9, 16, 24, generator=generator)
    alpha = (torch.rand(2, 9, 16, 24, generator=generator) > 0.97).float() * alpha  # sparse, partly covered pixels
    masks = tt.latent_shape_masks(alpha)
    assert masks.shape == (2, 3, 2, 3)
    groups = [[0], [1, 2, 3, 4], [5, 6, 7, 8]]  # the causal VAE's frames per latent frame
    for b in range(2):
        for f, frames in enumerate(groups):
            for y in range(2):
                for x in range(3):
                    cell = alpha[b, frames, 8 * y : 8 * y + 8, 8 * x : 8 * x + 8]
                    assert masks[b, f, y, x] == cell.max()
    with pytest.raises(ValueError, match="4k"):
        tt.latent_shape_masks(alpha[:, :8])


def _smoke_trainer(**train_changes):
    _, train_config = tt.PRESETS["smoke"]
    trainer = tt.Trainer(SMOKE_MODEL, dataclasses.replace(train_config, **train_changes), torch.device("cpu"), 0)
    trainer.vae_step = trainer.train_config.vae_steps  # straight to the transformer phase (the VAE's weights are
    trainer.latent_stats_done = True  # untrained: the latents are still the encoder's function of the video)
    return trainer


def test_paired_batches_hold_each_video_and_its_reversed_twin_under_the_same_noise_and_sigma(monkeypatch):
    from dit_sparse.pipelines.tiny.shapes import OPPOSITE, parse_caption

    trainer = _smoke_trainer(pair_reversed=True, batch_size=4, pool_size=8, pool_refresh=2, caption_dropout=0.0)
    seen = {}
    batch = trainer.batch
    monkeypatch.setattr(trainer, "batch", lambda: seen.setdefault("batch", batch()))

    def forward(hidden_states, timestep, encoder_hidden_states, return_dict):
        seen.update(noisy=hidden_states, timestep=timestep, text=encoder_hidden_states)
        return (trainer.transformer(hidden_states, timestep, encoder_hidden_states, return_dict=False)[0],)

    monkeypatch.setattr(trainer, "transformer_forward", forward)
    trainer.dit_train_step()
    x0, captions, masks = seen["batch"]
    assert len(captions) == 4
    for first, second in ((0, 1), (2, 3)):
        a, b = parse_caption(captions[first]), parse_caption(captions[second])
        assert b["direction"] == OPPOSITE[a["direction"]] and (a["colour"], a["shape"]) == (b["colour"], b["shape"])
        assert seen["timestep"][first] == seen["timestep"][second]
        sigma = float(seen["timestep"][first]) / 1000.0
        # same noise: the noisy inputs differ by (1 - sigma) times the clean latents' difference
        difference = seen["noisy"][first] - seen["noisy"][second]
        assert torch.allclose(difference, (1.0 - sigma) * (x0[first] - x0[second]), atol=1e-5)
        assert not torch.equal(masks[first], masks[second])  # the twin's track runs the other way
    assert seen["timestep"][0] != seen["timestep"][2]  # pairs are drawn independently
    # the pool holds the twin of each drawn video right after it, encoded from its own render
    latents, pool_captions, pool_masks = trainer.pool
    index = trainer.next_index - 1
    slot = trainer._pool_slots([index])
    assert slot == [2 * (index % 4), 2 * (index % 4) + 1]
    expected, expected_captions, expected_masks = trainer.render_training([index])
    assert torch.allclose(latents[slot], expected, atol=1e-5) and [pool_captions[i] for i in slot] == expected_captions
    assert torch.equal(pool_masks[slot], expected_masks)


def test_the_shape_weight_changes_the_update_not_the_logged_flow_loss():
    plain, weighted = _smoke_trainer(), _smoke_trainer(shape_weight=4.0)
    weighted.load_state_dict(plain.state_dict())  # the same weights, generator and data position
    losses = [trainer.dit_train_step() for trainer in (plain, weighted)]
    assert float(losses[0]) == float(losses[1])  # the same batch, noise and forward: the plain MSE is logged
    changed = [not torch.equal(a, b) for a, b in zip(plain._dit_parameters(), weighted._dit_parameters())]
    assert any(changed)
    masks = tt.latent_shape_masks(
        tt.shape_alpha([tt.video_params(0, 0)], SMOKE_MODEL.frames, SMOKE_MODEL.height, SMOKE_MODEL.width)
    )
    assert 0.0 < float(masks.mean()) < 1.0  # a mask that is neither empty nor everything


def test_bad_shape_weight_or_odd_pairing_sizes_are_refused():
    _, train_config = tt.PRESETS["smoke"]
    with pytest.raises(ValueError, match="shape_weight must be >= 0, got -1"):
        dataclasses.replace(train_config, shape_weight=-1.0)
    with pytest.raises(ValueError, match="even.*'pool_refresh': 1"):
        dataclasses.replace(train_config, pair_reversed=True, batch_size=2, pool_size=4, pool_refresh=1)


def test_the_training_probe_is_caption_sensitivity_of_the_ema_and_leaves_the_training_weights(tmp_path, capsys):
    trainer = _smoke_trainer()
    for _ in range(2):
        trainer.dit_train_step()
    before = [p.detach().clone() for p in trainer._dit_parameters()]
    assert any(not torch.equal(p, e) for p, e in zip(before, trainer.ema))  # the EMA lags the weights
    probed = trainer.probe(n=4)
    assert all(torch.equal(p, b) for p, b in zip(trainer._dit_parameters(), before))
    assert trainer.transformer.training and trainer.text_encoder.training
    assert probed == tt.caption_sensitivity(trainer.pipeline(), SMOKE_MODEL, n=4)  # the EMA copies, on the CPU

    checkpoint = tmp_path / "probe.pt"
    flags = ["--preset", "smoke", "--pair-reversed", "--shape-weight", "2", "--probe-every", "1e-9"]
    assert _train(checkpoint, *flags, "--batch-size", "2", "--pool-size", "4", "--pool-refresh", "2") == 0
    state = torch.load(checkpoint, weights_only=False)
    assert state["train_config"]["pair_reversed"] and state["train_config"]["shape_weight"] == 2.0
    assert "covers by 3 and each video is trained next to its time-reversed twin" in tt._recipe_text(
        tt.TrainConfig(**state["train_config"])
    )
    probes = [e for e in state["history"] if e["phase"] == "probe"]
    assert [e["step"] for e in probes] == [1, 2, 3, 3]  # after each step, and at the end of the chunk
    assert "[probe] step 3: flow loss by caption: true" in capsys.readouterr().out
