"""Train a tiny SentenceTransformer with InfoNCELoss in SentenceTransformerTrainer (run by
tests/test_sentence_transformers.py under torchrun or plain python); rank 0 saves the
trained parameters, the scale and the logged losses.

    python tests/st_train.py --model DIR --out FILE --batch 4 [--micro 2] [--learn-scale]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

#: (anchor, positive, negative) rows: the trainer draws batches of them.
ROWS = [
    (f"a photo of the digit {a}", f"the digit {a}", f"a photo of the digit {b}")
    for a, b in [
        ("zero", "one"), ("one", "two"), ("two", "three"), ("three", "four"),
        ("four", "five"), ("five", "six"), ("six", "seven"), ("seven", "eight"),
        ("eight", "nine"), ("nine", "zero"), ("zero", "two"), ("one", "three"),
        ("two", "four"), ("three", "five"), ("four", "six"), ("five", "seven"),
    ]
]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, required=True, help="per-device batch size")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--micro", type=int, default=None)
    parser.add_argument("--learn-scale", action="store_true")
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    from dist_infonce.integrations.sentence_transformers import InfoNCELoss

    torch.manual_seed(0)
    model = SentenceTransformer(args.model, device="cpu")
    data = Dataset.from_dict(
        {k: [r[i] for r in ROWS] for i, k in enumerate(("anchor", "positive", "negative"))}
    )
    loss = InfoNCELoss(model, scale=10.0, learn_scale=args.learn_scale, micro_batch_size=args.micro)
    training = SentenceTransformerTrainingArguments(
        output_dir=str(Path(args.out).parent / "st-trainer"),
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        seed=0,
        data_seed=0,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=True,
        dataloader_drop_last=True,
    )
    trainer = SentenceTransformerTrainer(model=model, args=training, train_dataset=data, loss=loss)
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save({"params": state, "scale": loss.scale, "losses": losses}, args.out)
        print(json.dumps({"losses": losses, "scale": loss.scale}))
    del trainer, loss, model
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
