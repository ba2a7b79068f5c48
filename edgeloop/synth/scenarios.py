"""Named synthetic scenarios: the baseline world a model is trained on, and the ways a camera's world changes.

Each scenario is a :class:`~edgeloop.synth.scenes.SceneParams`. ``shapes`` is the baseline; the
others are domain shifts of it, the situations the active-learning loop exists for: night
(dark, noisy), blur (defocus, a dirty lens), shifted (a new background, new looks of known
classes, smaller objects: the world changed after the model was trained) and crowded (many
small, overlapping objects).
"""

from __future__ import annotations

from edgeloop.synth.scenes import SceneParams


class UnknownScenarioError(ValueError):
    """A scenario name that is not in :data:`SCENARIOS`; the message lists the known names."""


_BASE = SceneParams()

#: Scenario name to parameters. Treat as read-only: :func:`get_scenario` hands out copies.
SCENARIOS: dict[str, SceneParams] = {
    "shapes": _BASE,
    "shapes-night": _BASE.updated(
        backgrounds=["dark"],
        brightness_gain=0.35,
        brightness_offset=-4.0,
        brightness_jitter=0.2,
        noise_sigma=10.0,
    ),
    "shapes-blur": _BASE.updated(blur_sigma=3.0),
    "shapes-shifted": _BASE.updated(
        backgrounds=["stripes"],
        appearances=["outline", "textured"],
        object_scale=(0.05, 0.12),
        saturation_range=(0.15, 0.5),
        distractors=(3, 8),
    ),
    "shapes-crowded": _BASE.updated(
        objects_per_image=(10, 24),
        object_scale=(0.06, 0.14),
        distractors=(4, 10),
        min_visible=0.3,
    ),
}


def scenario_names() -> list[str]:
    """The known scenario names, baseline first."""
    return list(SCENARIOS)


def get_scenario(name: str) -> SceneParams:
    """A copy of the named scenario's parameters.

    Raises:
        UnknownScenarioError: ``name`` is not a known scenario.
    """
    try:
        return SCENARIOS[name].model_copy(deep=True)
    except KeyError:
        raise UnknownScenarioError(
            f"unknown scenario {name!r}; known scenarios: {', '.join(scenario_names())}"
        ) from None
