"""Compress Guidance nodes: a MODEL patch for any sampler node, and a GUIDER for SamplerCustomAdvanced."""

from __future__ import annotations

from comfy_api.latest import io

from ..fastguidance.compress_guidance import COMPRESS_MODES, MAX_SKEW, CompressGuidance, validate_compress_guidance
from .engine_patch import cfg_guider, guider_inputs, install_policy
from .validation import CrossRule, ValidatedNode


_DEFAULTS = CompressGuidance()


def _settings_inputs() -> list:
    """The Compress Guidance settings, shared by the patch and the guider."""
    return [
        io.Float.Input(
            "compression", default=_DEFAULTS.compression, min=1.0, max=100.0, step=0.1, round=0.01,
            tooltip="Sampling steps per guided step, 1.0 to 100.0. 4.0 evaluates the negative prompt on a quarter "
                    "of the steps (20 steps: 5 guided, 25 model evaluations instead of 40). Higher = faster, "
                    "further from plain CFG. 1.0 guides every step (plain CFG). Ignored when guided_steps is above 0.",
        ),
        io.Int.Input(
            "guided_steps", default=_DEFAULTS.guided_steps, min=0, max=10000,
            tooltip="How many steps evaluate the negative prompt, as a number instead of a rate (with skew above "
                    "1.0 some of them coincide, so fewer are guided: the paper's rule). The first step is always "
                    "one of them; the sampler's steps or more guides every step (plain CFG). "
                    "0 = take the number from compression. Range 0 to 10000.",
        ),
        io.Float.Input(
            "skew", default=_DEFAULTS.skew, min=0.1, max=MAX_SKEW, step=0.1, round=0.01,
            tooltip=f"Where the guided steps go (0.1 to {MAX_SKEW}): step ⌊N·(j/n)^skew⌋ for j = 0…n−1, as in "
                    "the paper. 1.0 (default, the bench's best) spreads them evenly; larger values put them early "
                    "and, as in the paper, guide fewer steps (coinciding ones count once); below 1.0 puts them "
                    "late. Has no effect when every step is guided.",
        ),
        io.Combo.Input(
            "mode", options=list(COMPRESS_MODES), default=_DEFAULTS.mode,
            tooltip="What the steps between guided steps do. compress (default, the bench's best): they are not "
                    "guided, and the guided step before them gets their share of guidance (a guided step covering m "
                    "steps gets m times the guidance: the paper's compression). reuse: they keep applying the "
                    "guidance measured at the last guided step (the paper's reuse).",
        ),
    ]


#: the settings checked together (compression matters only without guided_steps)
_CHECKS = (CrossRule(validate_compress_guidance, ("compression", "guided_steps", "skew", "mode")),)


def _policy(compression: float, guided_steps: int, skew: float, mode: str) -> CompressGuidance:
    return CompressGuidance(compression=compression, guided_steps=guided_steps, skew=skew, mode=mode)


class CompressGuidanceNode(ValidatedNode):
    CHECKS = _CHECKS

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastGuidance_CompressGuidance",
            display_name="Compress Guidance (FastGuidance)",
            category="sampling/fastguidance",
            description="Makes CFG cheaper with any sampler node (KSampler, KSamplerAdvanced, SamplerCustomAdvanced): "
                        "the negative prompt is evaluated on a few steps only, chosen in advance; the guidance of the "
                        "steps between them is compressed onto them (Compress Guidance, Dinh et al.). "
                        "With compression 1.0, or cfg 1, it does nothing.",
            inputs=[io.Model.Input("model", tooltip="The model to make cheaper. Connect the output to your sampler.")]
            + _settings_inputs(),
            outputs=[io.Model.Output(tooltip="The same model, guided on the chosen steps only.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, compression: float, guided_steps: int, skew: float, mode: str) -> io.NodeOutput:
        policy = _policy(compression, guided_steps, skew, mode)
        return io.NodeOutput(install_policy(model, policy, cls.hidden.unique_id))


class CompressGuiderNode(ValidatedNode):
    CHECKS = _CHECKS

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastGuidance_CompressGuider",
            display_name="Compress Guider (FastGuidance)",
            category="sampling/custom_sampling/guiders",
            description="A CFG guider for SamplerCustomAdvanced that evaluates the negative prompt on a few steps "
                        "only and compresses the others' guidance onto them (Compress Guidance). With compression 1.0 it "
                        "equals the stock CFGGuider.",
            inputs=guider_inputs() + _settings_inputs(),
            outputs=[io.Guider.Output(tooltip="Connect to SamplerCustomAdvanced's guider input.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg: float, compression: float, guided_steps: int, skew: float,
                mode: str) -> io.NodeOutput:
        policy = _policy(compression, guided_steps, skew, mode)
        return io.NodeOutput(cfg_guider(model, positive, negative, cfg, policy, cls.hidden.unique_id))
