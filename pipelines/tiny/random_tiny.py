"""A tiny, randomly initialised (UNTRAINED) Wan 2.1 text-to-video pipeline, built entirely in code.

It has the real diffusers classes (`WanTransformer3DModel`, `AutoencoderKLWan`, `UMT5EncoderModel`,
`UniPCMultistepScheduler`) at toy sizes, so the whole data path (text encoder, denoising loop with
CFG, VAE decode) runs offline on a CPU in seconds. Its videos are noise-like: it exists to exercise
and time the machinery, never to judge quality. A trained tiny model will replace it as the default.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

TINY_RANDOM_LABEL = "tiny-random-wan (untrained)"

LATENT_CHANNELS = 16  # Wan 2.1's VAE z_dim, so its published latent mean/std apply unchanged
TEXT_DIM = 32  # the text encoder's d_model, the transformer's text_dim

VOCABULARY = tuple(
    (
        "a an the of in on at with and to from by over under near through into across while "
        "cat dog bird fish horse fox wolf bear person man woman child robot car boat train plane "
        "tree forest flower grass field river lake sea ocean wave beach mountain hill sky cloud "
        "sun moon star rain snow fire smoke city street road house window light shadow night day "
        "runs walks flies swims jumps dances rolls falls flows glows drifts spins sits sleeps "
        "red orange yellow green blue purple white black golden silver bright dark slow fast "
        "small large tiny huge old young calm stormy sunset sunrise camera pan zoom close view"
    ).split()
)
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5


def build_tiny_tokenizer(vocabulary: Sequence[str] = VOCABULARY) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over `vocabulary` that appends `</s>` like T5's.

    Ids: `SPECIAL_TOKENS` first (0, 1, 2), then the words in order, so a vocabulary that extends `VOCABULARY` at
    its end keeps every id of this one (the trained tiny model's tokenizer does, see `shapes.VOCABULARY`).
    """
    words = tuple(vocabulary)
    if len(set(words)) != len(words) or set(words) & set(SPECIAL_TOKENS):
        raise ValueError(f"vocabulary must be distinct words without {SPECIAL_TOKENS}, got {len(words)} entries")
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + words)}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", padding_side="right"
    )


def build_tiny_wan_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> WanPipeline:
    """An UNTRAINED tiny Wan pipeline with weights drawn from `seed` (the same seed gives the same weights).

    The global torch RNG is left as it was.
    """
    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(
            UMT5Config(
                vocab_size=len(tokenizer),
                d_model=TEXT_DIM,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                relative_attention_max_distance=32,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=tokenizer.pad_token_id,
            )
        )
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=32,
            in_channels=LATENT_CHANNELS,
            out_channels=LATENT_CHANNELS,
            text_dim=TEXT_DIM,
            freq_dim=32,
            ffn_dim=128,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
        )
        vae = AutoencoderKLWan(
            base_dim=4,
            z_dim=LATENT_CHANNELS,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=0,
            temperal_downsample=[False, True, True],
        )
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    )
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
    )
    for module in (text_encoder, transformer, vae):
        module.eval()  # as from_pretrained leaves them: the text encoder's dropout would make renders random
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    return pipe
