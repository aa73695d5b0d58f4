"""Reconstruction metrics (PSNR, SSIM, LPIPS, rFVD) of a Reducio-VAE checkpoint.

    python eval.py --config configs/reducio_ft4.py --checkpoint reducio-ft4.ckpt \
        --data /data/ucf101/val --num_clips 1000 --i3d i3d_pretrained_400.pt --out eval_out

Writes OUT/metrics.json, OUT/metrics.md, OUT/per_clip.jsonl and OUT/videos/*.mp4
(input | reconstruction). See docs/eval.md.
"""

import sys

from reducio_jax.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
