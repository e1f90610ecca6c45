"""Adaptive Guidance nodes: a MODEL patch for any sampler node, and a GUIDER for SamplerCustomAdvanced."""

from __future__ import annotations

from comfy_api.latest import io

from ..fastguidance.guidance import COSINE_SPACES
from ..fastguidance.adaptive_guidance import (AFTER_CUTOFF_MODES, CONVERGENCE_OFF, MAX_THRESHOLD, PAPER_SETTINGS,
                                              AdaptiveGuidance, validate_window)
from .engine_patch import cfg_guider, guider_inputs, install_policy
from .validation import CrossRule, ValidatedNode


_DEFAULTS = AdaptiveGuidance()
#: What an input added after the node shipped means when a saved prompt lacks it: the behaviour the
#: prompt was saved with. New nodes get the schema defaults; js/legacy_inputs.js does the same for
#: workflows loaded in the page.
LEGACY_VALUES = {"cosine_space": PAPER_SETTINGS["cosine_space"], "convergence": CONVERGENCE_OFF}
_PAPER = (f"The paper's exact rule: threshold {PAPER_SETTINGS['threshold']}, cosine_space "
          f"{PAPER_SETTINGS['cosine_space']}, convergence {PAPER_SETTINGS['convergence']}")


def _settings_inputs() -> list:
    """The Adaptive Guidance settings, shared by the patch and the guider."""
    return [
        io.Float.Input(
            "threshold", default=_DEFAULTS.threshold, min=0.0, max=MAX_THRESHOLD, step=0.0001, round=0.0001,
            tooltip=f"Stop guiding an image once the prompt and negative predictions point the same way "
                    f"(their cosine reaches this value). Lower = earlier cutoff, faster, less guidance. Default "
                    f"{_DEFAULTS.threshold} with cosine_space denoised (within 2 points of CFG's adherence on the "
                    f"bench, 15% fewer evaluations). 0.991 is the paper's value, for cosine_space noise. The node's chart "
                    f"shows the cosine of every step. Above 1.0 never cuts (plain CFG). Range 0 to {MAX_THRESHOLD}.",
        ),
        io.Float.Input(
            "start_percent", default=_DEFAULTS.start_percent, min=0.0, max=1.0, step=0.01,
            tooltip="Start of the window (fraction of the denoising, 0 = first step) in which guidance may be "
                    "cut. Before it every step is guided. 0.0 = from the start.",
        ),
        io.Float.Input(
            "end_percent", default=_DEFAULTS.end_percent, min=0.0, max=1.0, step=0.01,
            tooltip="End of the window (1 = last step). After it every step is guided again. 1.0 = to the end.",
        ),
        io.Combo.Input(
            "after_cutoff", options=list(AFTER_CUTOFF_MODES), default=_DEFAULTS.after_cutoff,
            tooltip="What a step does once guidance is cut: cond_only uses the prompt prediction alone (the "
                    "paper's method); reuse keeps applying the last measured guidance (experimental).",
        ),
        io.Combo.Input(
            "cosine_space", options=list(COSINE_SPACES), default=_DEFAULTS.cosine_space, optional=True,
            tooltip="Which predictions the cosine compares. denoised (default): the two predicted images "
                    "themselves, which differ early and converge late, as the paper's method needs. noise: the "
                    "paper's noise directions (x − prediction); at the first, very noisy steps they are nearly "
                    "parallel on most models, so the paper's 0.991 cuts right away and the picture comes out "
                    "unguided. " + _PAPER + ".",
        ),
        io.Float.Input(
            "convergence", default=_DEFAULTS.convergence, min=0.0, max=CONVERGENCE_OFF, step=0.05, round=0.01,
            optional=True,
            tooltip="A second condition for the cut: 1 − cosine must also have fallen to this fraction of its value "
                    "at the first step (0.5 = halved), so guidance is never cut at the first step, nor on a model "
                    "whose cosine does not rise (it stays plain CFG there). Range 0.0 to 1.0; 1.0 turns the "
                    "condition off (the paper's rule). Default 0.5.",
        ),
    ]


#: the settings checked together: the window's order (each setting alone is checked by its schema rule)
_CHECKS = (CrossRule(validate_window, ("start_percent", "end_percent")),)


def _policy(threshold: float, start_percent: float, end_percent: float, after_cutoff: str,
            cosine_space: str, convergence: float) -> AdaptiveGuidance:
    return AdaptiveGuidance(threshold=threshold, start_percent=start_percent, end_percent=end_percent,
                            after_cutoff=after_cutoff, cosine_space=cosine_space, convergence=convergence)


class AdaptiveGuidanceNode(ValidatedNode):
    CHECKS = _CHECKS

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastGuidance_AdaptiveGuidance",
            display_name="Adaptive Guidance (FastGuidance)",
            category="sampling/fastguidance",
            description="Makes CFG cheaper with any sampler node (KSampler, KSamplerAdvanced, SamplerCustomAdvanced): "
                        "once an image's prompt and negative predictions agree, its remaining steps skip the "
                        "negative-prompt evaluation (Adaptive Guidance, Castillo et al. 2023). With cfg 1 it does nothing.",
            inputs=[io.Model.Input("model", tooltip="The model to make cheaper. Connect the output to your sampler.")]
            + _settings_inputs(),
            outputs=[io.Model.Output(tooltip="The same model, with guidance cut once it no longer changes the image.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, threshold: float, start_percent: float, end_percent: float, after_cutoff: str,
                cosine_space: str = LEGACY_VALUES["cosine_space"],
                convergence: float = LEGACY_VALUES["convergence"]) -> io.NodeOutput:
        policy = _policy(threshold, start_percent, end_percent, after_cutoff, cosine_space, convergence)
        return io.NodeOutput(install_policy(model, policy, cls.hidden.unique_id))


class AdaptiveGuiderNode(ValidatedNode):
    CHECKS = _CHECKS

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastGuidance_AdaptiveGuider",
            display_name="Adaptive Guider (FastGuidance)",
            category="sampling/custom_sampling/guiders",
            description="A CFG guider for SamplerCustomAdvanced that stops guiding each image once its prompt and "
                        "negative predictions agree (Adaptive Guidance). With a threshold above 1 it equals the "
                        "stock CFGGuider.",
            inputs=guider_inputs() + _settings_inputs(),
            outputs=[io.Guider.Output(tooltip="Connect to SamplerCustomAdvanced's guider input.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg: float, threshold: float, start_percent: float,
                end_percent: float, after_cutoff: str, cosine_space: str = LEGACY_VALUES["cosine_space"],
                convergence: float = LEGACY_VALUES["convergence"]) -> io.NodeOutput:
        policy = _policy(threshold, start_percent, end_percent, after_cutoff, cosine_space, convergence)
        return io.NodeOutput(cfg_guider(model, positive, negative, cfg, policy, cls.hidden.unique_id))
