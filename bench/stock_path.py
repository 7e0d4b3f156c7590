"""Our pre-labeling vs the stock transformers path on the same SmolVLM2-shaped model (random weights, CPU).

Stock path, as the transformers documentation shows it for SmolVLM: for every window and every label, the
processor's ``apply_chat_template`` on a user turn of the window's frames and the label's question
(tokenised, image tokens expanded, pixels prepared), then ``model.generate`` for one token, whose logits
for "yes" and "no" give the decision. Ours: ``workers.jobs.prelabel_videos`` (frames encoded once per video,
windows batched, the video prefix computed once and shared by every label's question).

Both see the same decoded frames, the same square crops, the same prompt layout (chat header, frames,
question, "Assistant:") and the same weights, so their per-window yes/no decisions must agree; the check
prints how many do and the largest P(yes) difference. SmolVLM's video processor needs torchvision, which
this machine's torch build has none of, so the stock processor runs with its image half only (frames as a
list of images: the documented multi-image use).

    .venv/bin/python bench/stock_path.py [--videos 3] [--duration 20]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

warnings.filterwarnings("ignore")

LABELS = ["jam", "hand", "defect", "part_passing", "empty_line"]
CHAT_TEMPLATE = (
    "{{ '<|im_start|>' }}{% for m in messages %}{{ m.role | capitalize }}:"
    "{% if m.content is string %}{{ m.content }}{% else %}{% for c in m.content %}"
    "{% if c.type == 'image' %}<image>{% else %}{{ c.text }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def build(directory: Path, image_size: int = 128) -> int:
    """A SmolVLM2-architecture model at toy size, with a tokenizer and image processor saved beside it the
    way a hub checkpoint ships them. Returns the image tokens per frame."""
    from transformers import (
        LlamaConfig,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessorPil,
    )

    from workers.schemas import parse_labels
    from workers.stllm.testing import word_tokenizer

    torch.manual_seed(0)
    tok = word_tokenizer([label.question() for label in parse_labels(LABELS)])
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<end_of_utterance>"]})
    tok.chat_template = CHAT_TEMPLATE
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.1,
    )
    config = SmolVLMConfig(
        vision_config={
            "hidden_size": 128,
            "intermediate_size": 384,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": 16,
        },
        text_config=text.to_dict(),
        scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    SmolVLMForConditionalGeneration(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    SmolVLMImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    ).save_pretrained(directory)
    return (image_size // 16) ** 2 // 4


def stock_processor(directory: Path, image_seq_len: int):
    """SmolVLMProcessor with its image half (its video half needs torchvision). Frames go in as images,
    each expanded to ``image_seq_len`` image tokens; no split tiles (``do_image_splitting=False``)."""
    from transformers import AutoTokenizer, SmolVLMImageProcessorPil, SmolVLMProcessor

    class ImageOnlyProcessor(SmolVLMProcessor):
        def __init__(self):  # what SmolVLMProcessor.__init__ sets, minus the video processor
            self.image_processor = SmolVLMImageProcessorPil.from_pretrained(directory)
            self.tokenizer = AutoTokenizer.from_pretrained(directory)
            self.video_processor = SimpleNamespace(num_frames=None, fps=None)
            self.chat_template = CHAT_TEMPLATE
            self.fake_image_token, self.image_token, self.global_image_token = "", "<image>", ""
            self.image_token_id = self.tokenizer.convert_tokens_to_ids("<image>")
            self.end_of_utterance_token = "<end_of_utterance>"
            self.image_seq_len = image_seq_len

    return ImageOnlyProcessor()


def stock_prelabel(model, processor, videos: list[str], questions: list[str], settings, side: int, size: int):
    """P(yes) per (video, window, label) the stock way: one processor call and one generate per pair."""
    from PIL import Image

    from workers.jobs import decode_windows
    from workers.stllm.video import preprocess_frames

    settings = settings.resolved()  # a fresh model records no windows: the default ones
    yes, no = processor.tokenizer.convert_tokens_to_ids(["yes", "no"])
    out = []
    for path in videos:
        d = decode_windows(
            path,
            settings.window_s,
            settings.stride_s,
            settings.frames_per_window,
            settings.global_frames,
            side,
        )
        crops = preprocess_frames(d.frames, size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # the same square crops
        images = [
            Image.fromarray((c.permute(1, 2, 0) * 255).round().clamp(0, 255).byte().numpy()) for c in crops
        ]
        probs = np.zeros((len(d.window_index), len(questions)))
        for w, idx in enumerate(d.window_index):
            for q, question in enumerate(questions):
                content = [{"type": "image", "image": images[i]} for i in idx.tolist()]
                messages = [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]
                inputs = processor.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
                )
                gen = model.generate(
                    **inputs,
                    max_new_tokens=1,
                    do_sample=False,
                    output_logits=True,
                    return_dict_in_generate=True,
                )
                logits = gen.logits[0][0, [yes, no]].float()
                probs[w, q] = float(logits.softmax(-1)[0])
        out.append(probs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=3)
    ap.add_argument("--duration", type=float, default=20.0)
    args = ap.parse_args()
    from transformers import SmolVLMForConditionalGeneration

    from workers.jobs import decode_side, prelabel_videos
    from workers.schemas import PrelabelSettings, parse_labels
    from workers.stllm.io import build_model
    from workers.tools.linevideo import generate_dataset

    work = Path(tempfile.mkdtemp(prefix="stllm-stock-"))
    k = build(work / "model")
    videos = [r["video"] for r in generate_dataset(work / "v", args.videos, seed=500, duration=args.duration)]
    labels = parse_labels(LABELS)
    questions = [x.question() for x in labels]
    settings = PrelabelSettings()
    torch.set_num_threads(torch.get_num_threads())

    stock = SmolVLMForConditionalGeneration.from_pretrained(work / "model", dtype=torch.float32).eval()
    processor = stock_processor(work / "model", k)
    ours = build_model({"kind": "smolvlm2", "model": str(work / "model")}, device="cpu", dtype="fp32").eval()
    ours_bf16 = build_model(
        {"kind": "smolvlm2", "model": str(work / "model")}, device="cpu", dtype="bf16"
    ).eval()
    ours_bf16.inference_weights()  # as workers serve
    size = ours.backbone.image_size

    prelabel_videos(ours, videos[:1], labels, settings)  # warm-up
    t = time.perf_counter()
    mine = prelabel_videos(ours, videos, labels, settings)
    t_ours = time.perf_counter() - t
    prelabel_videos(ours_bf16, videos[:1], labels, settings)
    t = time.perf_counter()
    mine_bf16 = prelabel_videos(ours_bf16, videos, labels, settings)
    t_bf16 = time.perf_counter() - t
    with torch.inference_mode():
        stock_prelabel(
            stock, processor, videos[:1], questions[:1], settings, decode_side(ours), size
        )  # warm-up
        t = time.perf_counter()
        theirs = stock_prelabel(stock, processor, videos, questions, settings, decode_side(ours), size)
        t_stock = time.perf_counter() - t

    p_ours = np.concatenate([np.stack([r.window_probs[x] for x in LABELS], 1) for r in mine])
    p_bf16 = np.concatenate([np.stack([r.window_probs[x] for x in LABELS], 1) for r in mine_bf16])
    p_stock = np.concatenate(theirs)
    agree = ((p_ours > 0.5) == (p_stock > 0.5)).mean()
    agree_bf16 = ((p_bf16 > 0.5) == (p_stock > 0.5)).mean()
    n = len(videos)
    windows = p_ours.shape[0]
    print(
        f"SmolVLM2-shaped random model (SigLIP 2x128, Llama 4x256, {k} tokens/frame), {n} x {args.duration:.0f} s "
        f"videos, {windows} windows of {settings.frames_per_window} frames, {len(LABELS)} labels, "
        f"{torch.get_num_threads()} CPU threads"
    )
    print(
        f"stock (processor + chat template + generate per label per window), fp32: {t_stock:.1f} s, {n / t_stock:.3f} videos/s"
    )
    print(f"ours, fp32: {t_ours:.1f} s, {n / t_ours:.3f} videos/s -> {t_stock / t_ours:.1f}x the stock path")
    print(f"ours, bf16: {t_bf16:.1f} s, {n / t_bf16:.3f} videos/s -> {t_stock / t_bf16:.1f}x the stock path")
    print(
        f"same yes/no decisions per (window, label): fp32 {100 * agree:.1f}% of {p_ours.size} "
        f"(max |P(yes) difference| {np.abs(p_ours - p_stock).max():.2e}); bf16 {100 * agree_bf16:.1f}% "
        f"(max {np.abs(p_bf16 - p_stock).max():.2e})"
    )
    flipped = (p_bf16 > 0.5) != (p_stock > 0.5)
    if flipped.any():
        print(
            f"bf16's {flipped.sum()} flipped decisions all have the stock path's P(yes) within "
            f"{np.abs(p_stock[flipped] - 0.5).max():.3f} of 0.5"
        )
    print("\ncommand: .venv/bin/python " + shlex.join(sys.argv))


if __name__ == "__main__":
    main()
