"""Label a folder of images into COCO (and YOLO segmentation, PNG masks), against a server or locally.

    python -m segmentation.label IMAGES --prompt "cat ; dog" --url http://127.0.0.1:3000 --out DIR
    python -m segmentation.label IMAGES --prompt "cat ; dog" --model-dir PALIGEMMA --vae vae-oid.npz --out DIR

Writes DIR/coco.json (paths relative to IMAGES), DIR/failures.json and DIR/answers.jsonl (the log a
rerun resumes from). See `segmentation.data.labelling`. With --url the server is asked once before
anything starts. Exit status 0 when every image was labelled, 1 when some failed, 2 for bad arguments,
3 when no server answers at --url.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from .data.labelling import DEFAULT_BATCH_SIZE, DEFAULT_CONCURRENCY, label_folder


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m segmentation.label", description=__doc__.split("\n")[0])
    parser.add_argument("images", type=Path, help="folder of images (searched recursively)")
    parser.add_argument("--prompt", required=True, help='classes separated by ";", e.g. "cat ; dog"')
    parser.add_argument("--out", type=Path, required=True, help="output folder (a rerun resumes there)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="segmentation server, e.g. http://127.0.0.1:3000")
    where.add_argument("--model-dir", type=Path, help="run the library locally on this PaliGemma directory")
    parser.add_argument("--vae", type=Path, help="vae-oid.npz (with --model-dir)")
    parser.add_argument("--api-key", help="bearer key for the server (default: none)")
    parser.add_argument("--model", help="served model id (default: the server's default)")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                        help=f"requests in flight (default {DEFAULT_CONCURRENCY}: keeps the server's batches full)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="images per batch with --model-dir")
    parser.add_argument("--labels-from-prompt", action="store_true",
                        help="labels may only be the prompt's classes, so the COCO categories are exactly "
                             "the prompt's (ids 1..); applies to images not already answered in OUT")
    parser.add_argument("--yolo", action="store_true", help="also write DIR/yolo/<path>.txt (YOLO segmentation)")
    parser.add_argument("--png-masks", action="store_true", help="also write DIR/masks/<path>.png (instance maps)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.model_dir is not None and args.vae is None:
        parser.error("--model-dir needs --vae FILE (the vae-oid.npz mask decoder)")
    if not args.images.is_dir():
        parser.error(f"{args.images} is not a folder")
    if args.yolo and importlib.util.find_spec("cv2") is None:
        parser.error("--yolo traces mask outlines with OpenCV: pip install opencv-python-headless")
    if args.concurrency < 1 or args.batch_size < 1:
        parser.error("--concurrency and --batch-size must be at least 1")
    if args.url is not None:
        from .client import check_url

        try:
            args.url = check_url(args.url)
        except ValueError as exc:
            parser.error(f"--url: {exc}")
    return args


NO_SERVER_HINT = ("start one in the project's folder with `make demo` (the demo model) or `make serve`, "
                  "or give a running server's address with --url; --model-dir DIR --vae FILE labels without one")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = dict(yolo=args.yolo, png_masks=args.png_masks, labels_from_prompt=args.labels_from_prompt,
                   progress=not args.no_progress)
    from .client import ServerUnreachable
    from .model.prompts import PromptError

    try:
        if args.url:
            from .client import AsyncRemoteSegmenter, check_server
            from .model.conversions import prompt_classes

            prompt_classes(args.prompt)  # a bad prompt is an argument error, whether a server answers or not
            check_server(args.url, hint=NO_SERVER_HINT)  # once, before any work: stop at once if nobody answers
            segmenter = AsyncRemoteSegmenter(args.url, args.api_key, model=args.model, concurrency=args.concurrency)
            summary = label_folder(args.images, args.out, args.prompt, segmenter, remote=True,
                                   concurrency=args.concurrency, **options)
        else:
            from .model.segmenter import Segmenter

            segmenter = Segmenter.from_pretrained(args.model_dir, args.vae)
            summary = label_folder(args.images, args.out, args.prompt, segmenter, remote=False,
                                   batch_size=args.batch_size, **options)
    except PromptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ServerUnreachable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"interrupted; finished images are kept in {args.out}: run again to resume", file=sys.stderr)
        return 130
    print("\n".join(summary.lines()))
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
