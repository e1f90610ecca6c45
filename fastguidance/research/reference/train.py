"""Training of the reference model and of the adherence classifier, reproducible from a seed.

    python -m fastguidance.research.reference.train classifier   # a few minutes on 2 CPU cores
    python -m fastguidance.research.reference.train model        # about 50 min on 2 CPU cores
    python -m fastguidance.research.reference.train step_predictor   # AdaDiff's predictor for the model, minutes
    python -m fastguidance.research.reference.train adapters         # AGD adapters for the model, minutes

Data is drawn fresh at every step from the scene generator (training combinations only; the
held-out colour–shape pairs are never seen by the diffusion model). Files are written atomically,
and an existing file is only replaced with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import random
import sys
import time
from pathlib import Path

import torch

from .classifier import SceneClassifier, attribute_accuracy, classifier_loss, label_tensors
from .model import ModelConfig, ReferenceModel, from_image, to_image
from ..cli import CommandLineParser, require_writable_file, run_refusing_in_one_line
from ...errors import InvalidInputError
from ...validation import portable_file_name, require_number
from ...fingerprint import weights_fingerprint
from ...metrics import ssim
from ..sampling import sample
from ...schedules import make_sigmas
from ...step_predictor import StepPredictor, conditioning_features, save_step_predictor, train_step_policy
from .scenes import MAX_CAPTION_NOISE, check_caption_noise, make_batch, noisy_caption, random_scene
from .weights import (ADAPTERS_PATH, CLASSIFIER_PATH, MODEL_PATH, STEP_PREDICTOR_PATH, load_model, save_classifier,
                      save_model)

log = logging.getLogger("fastguidance")


def _lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_classifier(steps: int = 1200, batch: int = 96, seed: int = 0, lr: float = 2e-3,
                     progress: bool = False) -> tuple[SceneClassifier, dict]:
    """Train the classifier on rendered scenes (all combinations, with noise and blur augmentation
    so that imperfect generated images are read fairly)."""
    torch.manual_seed(seed)
    classifier = SceneClassifier()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(steps):
        data = make_batch(batch, seed=seed * 1_000_003 + step, held_out=None)
        images = data.images
        noise = torch.rand(batch, 1, 1, 1, generator=generator) * 0.12
        images = (images + noise * torch.randn(images.shape, generator=generator)).clamp(0, 1)
        blur = torch.rand(batch, generator=generator) < 0.3
        if blur.any():
            images[blur] = torch.nn.functional.avg_pool2d(images[blur], 3, stride=1, padding=1, count_include_pad=False)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr, 100)
        loss = classifier_loss(classifier(images), label_tensors(data.scenes))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress and (step % 100 == 0 or step == steps - 1):
            log.info("classifier step %d/%d loss %.4f", step, steps, loss.item())
    classifier.eval()
    test = make_batch(1000, seed=10_000_019 + seed, held_out=None)
    accuracy = attribute_accuracy(classifier, test.images, test.scenes)
    info = {"steps": steps, "batch": batch, "seed": seed, "lr": lr, "seconds": time.perf_counter() - start,
            "test_accuracy": accuracy, "final_loss": loss.item()}
    return classifier, info


def train_model(steps: int = 4000, batch: int = 64, seed: int = 0, lr: float = 1.5e-3, drop_rate: float = 0.15,
                ema_decay: float = 0.998, config: ModelConfig | None = None, loss_weighting: str = "epsilon",
                caption_noise: float = 0.0, progress: bool = False) -> tuple[ReferenceModel, dict]:
    """Train the diffusion model: epsilon prediction, uniform timesteps, prompts replaced by the
    empty prompt with probability ``drop_rate`` so that CFG has an unconditional model to use
    (Ho & Salimans 2022, §3.2). Returns the EMA weights.

    ``loss_weighting``: see :func:`diffusion_loss`. ``caption_noise``: the share of prompt words
    replaced by a wrong one (:func:`~.scenes.noisy_caption`), drawn from its own random stream so
    that 0 trains exactly as before the option existed."""
    _loss_weights(loss_weighting)  # refuse an unknown weighting before any work
    check_caption_noise(caption_noise)
    torch.manual_seed(seed)
    # Channels-last convolutions make a step about 10% faster on the 2-core CPU machines (the
    # convolutions and their gradients are half of a step). Only the memory order of the weights
    # changes, but the convolutions round differently, so a retrain under another layout gives a
    # model of the same recipe, not the same bytes.
    model = ReferenceModel(config).to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, foreach=True)
    parameters, ema_parameters = list(model.parameters()), list(ema.parameters())
    generator = torch.Generator().manual_seed(seed + 1)
    rng = random.Random(seed + 2)
    caption_rng = random.Random(seed + 3)
    sigmas = model.schedule.sigmas
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        data = make_batch(batch, seed=seed * 1_000_003 + step, held_out=False)
        x0 = from_image(data.images)
        prompts = ["" if rng.random() < drop_rate else noisy_caption(scene, caption_rng, caption_noise).prompt
                   for scene in data.scenes]
        timesteps = torch.randint(0, len(sigmas), (batch,), generator=generator)
        sigma = sigmas[timesteps]
        noise = torch.randn(x0.shape, generator=generator)
        x = (x0 + sigma.reshape(-1, 1, 1, 1) * noise).contiguous(memory_format=torch.channels_last)
        text = model.text_encoder(model.tokenizer(prompts))
        prediction = model.unet(x / torch.sqrt(sigma.reshape(-1, 1, 1, 1) ** 2 + 1), timesteps, text)
        loss = diffusion_loss(prediction, noise, sigma, sigmas, loss_weighting)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr, 200)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0, foreach=True)
        optimizer.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            # one update for all tensors, like the foreach AdamW and clipping (per-tensor loops cost
            # about 3% of a step together); torch.optim.swa_utils' EMA uses the same private op
            torch._foreach_lerp_(ema_parameters, parameters, 1 - decay)
        losses.append(loss.item())
        if progress and (step % 100 == 0 or step == steps - 1):
            recent = sum(losses[-100:]) / len(losses[-100:])
            log.info("model step %d/%d loss %.4f (%.0f s)", step, steps, recent, time.perf_counter() - start)
    ema = ema.to(memory_format=torch.contiguous_format).eval()  # safetensors stores contiguous tensors
    info = {"steps": steps, "batch": batch, "seed": seed, "lr": lr, "drop_rate": drop_rate, "ema_decay": ema_decay,
            "loss_weighting": loss_weighting, "caption_noise": caption_noise,
            "seconds": time.perf_counter() - start, "final_loss": sum(losses[-200:]) / len(losses[-200:]),
            "loss_every_100": [sum(losses[i:i + 100]) / len(losses[i:i + 100]) for i in range(0, len(losses), 100)]}
    return ema, info


LOSS_WEIGHTINGS = ("epsilon", "v", "high_noise")
#: "high_noise": the epsilon loss of timesteps at σ ≥ HIGH_NOISE_SIGMA counts HIGH_NOISE_WEIGHT times
HIGH_NOISE_SIGMA = 5.0
HIGH_NOISE_WEIGHT = 5.0


def diffusion_loss(prediction: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, schedule_sigmas: torch.Tensor,
                   loss_weighting: str = "epsilon") -> torch.Tensor:
    """The training loss of an epsilon-prediction model.

    "epsilon" (the shipped model's) is DDPM's plain ‖ε̂ − ε‖² (Ho et al. 2020, Eq. 14), computed by
    the same operation as before the option existed. "v" weighs each example's ‖ε̂ − ε‖² by
    (1 + σ²) / (the mean of 1 + σ² over ``schedule_sigmas``): 1 + σ² makes it the v-prediction loss
    ‖v̂ − v‖² (Salimans & Ho 2022, §4) of an epsilon model; the division keeps its scale near the
    epsilon loss's, but the two losses are not comparable numbers (weights run from 0.05 to 10 on
    Stable Diffusion's schedule; the top tenth of the timesteps carries 60% of the weight). Why
    offer it: the epsilon loss weighs an error of the denoised picture by 1/σ² (x̂0 = x − σ·ε̂), so at
    high noise, the only place where the prompt alone decides where an object goes, a misplaced
    object costs ~1/200 of what it costs at σ = 1.

    "high_noise" weighs the examples at σ ≥ :data:`HIGH_NOISE_SIGMA` by :data:`HIGH_NOISE_WEIGHT` and
    all others by 1 (then divides by the schedule mean, as "v" does). On the reference schedule that
    gives the top fifth of the timesteps (where placement is decided) about half of the loss, as the
    "v" weighting capped at 25 did, while the timesteps below σ = 1 (where shapes are drawn) keep
    about a fifth of it instead of a twentieth: the capped weighting learned positions but lost
    shapes (README, The reference model).
    """
    if loss_weighting == "epsilon":
        return torch.nn.functional.mse_loss(prediction, noise)
    weight_of_sigma = _loss_weights(loss_weighting)
    per_example = (prediction - noise).pow(2).mean(dim=(1, 2, 3))
    return (per_example * weight_of_sigma(sigma)).mean() / weight_of_sigma(schedule_sigmas).mean()


def _loss_weights(name: str):
    """σ → weight of the epsilon loss before normalisation, per :func:`diffusion_loss`."""
    if name == "v":
        return lambda sigma: 1.0 + sigma**2
    if name == "high_noise":
        return lambda sigma: 1.0 + (HIGH_NOISE_WEIGHT - 1.0) * (sigma >= HIGH_NOISE_SIGMA).to(sigma.dtype)
    if name == "epsilon":
        return torch.ones_like
    raise InvalidInputError("loss_weighting", name, f"use one of {', '.join(LOSS_WEIGHTINGS)}")


#: AdaDiff on the reference model: the options end at the benchmark's default 20 steps, the "fixed maximum"
REFERENCE_STEP_OPTIONS = (5, 10, 15, 20)


def reference_prompt_features(model: ReferenceModel, prompts: list[str]) -> torch.Tensor:
    """AdaDiff's features of the reference model's conditioning (mean of real tokens + pooled)."""
    text = model.encode(prompts)
    return conditioning_features(text.tokens, text.pooled, text.mask)


@torch.no_grad()
def render_prompts(model: ReferenceModel, prompts: list[str], noise: torch.Tensor, steps: int, scale: float,
                   sampler: str, scheduler: str, batch: int = 32) -> torch.Tensor:
    """Images in [0, 1] of ``prompts`` from ``noise`` with CFG at ``scale`` (1 = no guidance), in batches."""
    sigmas = make_sigmas(model.schedule, scheduler, steps)
    uncond = model.encode([""])
    images = []
    for start in range(0, len(prompts), batch):
        rows = slice(start, start + batch)
        latent = sample(model, noise[rows], sigmas, model.encode(prompts[rows]), uncond, scale, sampler).latent
        images.append(to_image(latent))
    return torch.cat(images)


def train_reference_step_predictor(model: ReferenceModel, options=REFERENCE_STEP_OPTIONS, prompts: int = 256,
                                   iterations: int = 120, batch: int = 32, cost_weight: float = 0.3, scale: float = 5.0,
                                   sampler: str = "dpmpp_2m", scheduler: str = "karras", seed: int = 0,
                                   progress: bool = False) -> tuple[StepPredictor, dict]:
    """AdaDiff on the reference model: quality = SSIM to the max-steps image of the same prompt and noise."""
    start = time.perf_counter()
    rng = random.Random(2_000_000 + seed)
    pool = [random_scene(rng, held_out=False).prompt for _ in range(prompts)]
    noise = torch.randn(prompts, 3, 32, 32, generator=torch.Generator().manual_seed(2_000_000 + seed))
    with torch.no_grad():
        features = reference_prompt_features(model, pool)
    max_steps = max(options)
    reference = render_prompts(model, pool, noise, max_steps, scale, sampler, scheduler)

    def quality_of(rows: torch.Tensor, steps: list[int]) -> torch.Tensor:
        quality = torch.zeros(len(rows))
        for chosen in sorted(set(steps)):
            where = [i for i, s in enumerate(steps) if s == chosen]
            picked = rows[where]
            images = reference[picked] if chosen == max_steps else render_prompts(
                model, [pool[i] for i in picked.tolist()], noise[picked], chosen, scale, sampler, scheduler)
            quality[where] = ssim(images, reference[picked]).float()
        return quality

    def report(iteration: int, total: int, reward: float) -> None:
        if progress and (iteration % 10 == 0 or iteration == total):
            log.info("step predictor iteration %d/%d mean reward %.4f (%.0f s)", iteration, total, reward,
                     time.perf_counter() - start)

    predictor = StepPredictor(features.shape[1], options)
    training = train_step_policy(predictor, features, quality_of, iterations, batch, cost_weight, seed,
                                 progress=report)
    info = {"options": list(options), "cost_weight": cost_weight, "sampler": sampler, "scheduler": scheduler,
            "cfg": scale, "prompts": prompts, "iterations": iterations, "batch": batch, "seed": seed,
            "quality": "SSIM to the max-steps image (kornia)", "seconds": time.perf_counter() - start,
            "reward_curve": training.reward, "steps_curve": training.steps,
            "model_fingerprint": weights_fingerprint(model.state_dict().items())}
    return predictor.eval(), info


#: the default training steps and batch of each command (``--steps`` / ``--batch`` left out)
DEFAULT_STEPS = {"classifier": 1200, "model": 4000, "step_predictor": 120, "adapters": 600}
DEFAULT_BATCH = {"classifier": 96, "model": 64, "step_predictor": 32, "adapters": 64}
PROG = "python -m fastguidance.research.reference.train"


def check_options(options: argparse.Namespace) -> None:
    """Every option checked before any model is loaded or trained; :class:`InvalidInputError` names
    the first bad one and its fix (one line on the command line)."""
    if options.steps is not None:
        require_number("--steps", options.steps, 1, 1_000_000, "use a whole number of training steps from 1 "
                       f"(default for {options.what}: {DEFAULT_STEPS[options.what]})", integer=True)
    if options.batch is not None:
        require_number("--batch", options.batch, 1, 4096, "use a whole number of examples per step from 1 to 4096 "
                       f"(default for {options.what}: {DEFAULT_BATCH[options.what]})", integer=True)
    require_number("--seed", options.seed, 0, 2**63 - 1, "use a whole number from 0 to 2**63 − 1", integer=True)
    require_number("--width", options.width, 8, 512, f"use a multiple of 8 from 8 to 512 (default {ModelConfig.width}; "
                   "GroupNorm's 8 groups need it)", integer=True)
    if options.width % 8:
        raise InvalidInputError("--width", options.width, f"use a multiple of 8 (GroupNorm's 8 groups), e.g. "
                                                          f"{max(8, options.width // 8 * 8)}")
    caption_fix = f"use a share of words from 0 (exact captions) to below {MAX_CAPTION_NOISE}"
    require_number("--caption-noise", options.caption_noise, 0.0, MAX_CAPTION_NOISE, caption_fix)
    if options.caption_noise >= MAX_CAPTION_NOISE:
        raise InvalidInputError("--caption-noise", options.caption_noise, caption_fix)
    require_number("--cost-weight", options.cost_weight, 0.0, 10.0,
                   "use λ from 0 (quality only) to 10 (default 0.1: steps cost a little)")
    for option, given in (("--loss-weighting", options.loss_weighting != "epsilon"),
                          ("--query-coordinates", options.query_coordinates), ("--caption-noise", options.caption_noise)):
        if given and options.what != "model":
            raise InvalidInputError(option, getattr(options, option[2:].replace("-", "_")),
                                    f"it only applies to `model`, not `{options.what}`; leave it out")
    if options.what != "step_predictor" and options.cost_weight != 0.1:
        raise InvalidInputError("--cost-weight", options.cost_weight, "it only applies to `step_predictor`; leave it out")
    out = options.out or {"adapters": ADAPTERS_PATH, "step_predictor": STEP_PREDICTOR_PATH,
                          "classifier": CLASSIFIER_PATH, "model": MODEL_PATH}[options.what]
    if out.suffix != ".safetensors":
        raise InvalidInputError("--out", str(out), "name a .safetensors file (the pack's files are safetensors)")
    portable_file_name(out.name, "--out")
    require_writable_file("--out", out, must_exist=False)
    _refuse_overwrite(out, options.overwrite)
    if options.what in ("adapters", "step_predictor") and not MODEL_PATH.is_file():
        raise InvalidInputError(options.what, str(MODEL_PATH), "the reference model is missing; train it first with "
                                                               f"`{PROG} model`")


def main(argv: list[str] | None = None) -> None:
    parser = CommandLineParser(prog=PROG, description=__doc__)
    parser.add_argument("what", choices=("classifier", "model", "step_predictor", "adapters"), help="what to train")
    parser.add_argument("--steps", type=int, help="training steps (default: " + ", ".join(
        f"{steps} {what}" for what, steps in DEFAULT_STEPS.items()) + ")")
    parser.add_argument("--batch", type=int, help="examples per step (default: " + ", ".join(
        f"{batch} {what}" for what, batch in DEFAULT_BATCH.items()) + ")")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the initial weights")
    parser.add_argument("--width", type=int, default=ModelConfig.width, help="model: channels at 32×32, a multiple of 8")
    parser.add_argument("--loss-weighting", choices=LOSS_WEIGHTINGS, default="epsilon",
                        help="model: weight of the epsilon loss per noise level (default epsilon = 1; v = (1 + σ²) / its schedule mean; "
                             "high_noise = 5 where σ ≥ 5, else 1, over its schedule mean)")
    parser.add_argument("--caption-noise", type=float, default=0.0,
                        help=f"model: share of prompt words replaced by a wrong one, like web captions (0 to below {MAX_CAPTION_NOISE}; default 0)")
    parser.add_argument("--query-coordinates", action="store_true",
                        help="model: add each pixel's (x, y) to the cross-attention queries (ModelConfig.query_coordinates)")
    parser.add_argument("--cost-weight", type=float, default=0.1, help="step_predictor: λ of the reward (default 0.1)")
    parser.add_argument("--out", type=Path, help="output .safetensors file (default: the shipped weights; its folder "
                                                 "is checked writable before training)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file")
    options = parser.parse_args(argv)
    run_refusing_in_one_line(PROG, lambda: _train(options))


def _train(options: argparse.Namespace) -> None:
    check_options(options)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if options.what == "adapters":
        from ...guidance_adapters.adapters import save_adapters
        from .adapters import train_reference_adapters

        out = options.out or ADAPTERS_PATH
        _refuse_overwrite(out, options.overwrite)
        began = time.perf_counter()

        def report(step: int, total: int, loss: float) -> None:
            if step % 50 == 0 or step == total:
                log.info("adapters step %d/%d loss %.5f (%.0f s)", step, total, loss, time.perf_counter() - began)

        adapters, info = train_reference_adapters(load_model(MODEL_PATH), train_steps=options.steps or DEFAULT_STEPS["adapters"],
                                                  batch=options.batch or DEFAULT_BATCH["adapters"], seed=options.seed, progress=report)
        save_adapters(adapters, out, info, overwrite=options.overwrite)
        log.info("adapters: %d parameters (%.1f%% of the UNet), final loss %.5f in %.0f s -> %s",
                 adapters.count_parameters(), 100 * adapters.count_parameters() / info["base_parameters"],
                 info["final_loss"], info["seconds"], out)
    elif options.what == "step_predictor":
        out = options.out or STEP_PREDICTOR_PATH
        _refuse_overwrite(out, options.overwrite)
        predictor, info = train_reference_step_predictor(load_model(MODEL_PATH), iterations=options.steps or DEFAULT_STEPS["step_predictor"],
                                                         batch=options.batch or DEFAULT_BATCH["step_predictor"], cost_weight=options.cost_weight,
                                                         seed=options.seed, progress=True)
        save_step_predictor(predictor, out, info, overwrite=options.overwrite)
        log.info("step predictor: final mean reward %.4f in %.0f s -> %s", sum(info["reward_curve"][-10:]) / 10,
                 info["seconds"], out)
    elif options.what == "classifier":
        out = options.out or CLASSIFIER_PATH
        _refuse_overwrite(out, options.overwrite)
        classifier, info = train_classifier(options.steps or DEFAULT_STEPS["classifier"], options.batch or DEFAULT_BATCH["classifier"], options.seed, progress=True)
        save_classifier(classifier, info, out, overwrite=options.overwrite)
        log.info("classifier: test accuracy %.4f in %.0f s -> %s", info["test_accuracy"], info["seconds"], out)
    else:
        out = options.out or MODEL_PATH
        _refuse_overwrite(out, options.overwrite)
        config = ModelConfig(width=options.width, query_coordinates=options.query_coordinates)
        model, info = train_model(options.steps or DEFAULT_STEPS["model"], options.batch or DEFAULT_BATCH["model"], options.seed,
                                  config=config, loss_weighting=options.loss_weighting,
                                  caption_noise=options.caption_noise, progress=True)
        save_model(model, info, out, overwrite=options.overwrite)
        log.info("model: final loss %.4f in %.0f s -> %s", info["final_loss"], info["seconds"], out)


def _refuse_overwrite(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise InvalidInputError("--out", str(path), "the file exists; pass --overwrite to replace it (or --out to "
                                                    "write elsewhere)")


if __name__ == "__main__":
    main()
