"""The search space, define-by-run: each suggestion next to the config field it sets."""

from __future__ import annotations

import optuna

from model.unet import BLOCKS, OUTPUTS, PRESETS, UPSAMPLES, UNetConfig, params_of
from sweep.train import LOSSES, TrainConfig, split_config

BASE_FILTERS = (8, 12, 16, 24, 32, 48)
BATCH_SIZES = (32, 64, 128)
# Every axis at its smallest: no variant of the space has fewer parameters (the plain
# block, transposed convs and no gates are each the cheapest of their axis; one output
# channel is cheaper than two).
SMALLEST = UNetConfig(base_filters=BASE_FILTERS[0], depth=1, enc_convs=1, dec_convs=1,
                      decoder_width_mult=1, depthwise_head=False, output="one")
# The lever axes, each at its cheapest, in the order shrink_steps gives them up.
CHEAPEST_LEVERS = {"block": "plain", "upsample": "transpose", "attention_gates": False,
                   "output": "one"}


def suggest_model(trial: optuna.Trial) -> dict:
    return {
        "base_filters": trial.suggest_categorical("base_filters", BASE_FILTERS),
        "depth": trial.suggest_int("depth", 1, 3),
        "enc_convs": trial.suggest_int("enc_convs", 1, 3),
        "dec_convs": trial.suggest_int("dec_convs", 1, 4),
        "decoder_width_mult": trial.suggest_categorical("decoder_width_mult", (1, 2, 4)),
        "depthwise_head": trial.suggest_categorical("depthwise_head", (True, False)),
        "block": trial.suggest_categorical("block", BLOCKS),
        "upsample": trial.suggest_categorical("upsample", UPSAMPLES),
        "attention_gates": trial.suggest_categorical("attention_gates", (False, True)),
        **suggest_output(trial),
    }


def suggest_output(trial: optuna.Trial) -> dict:
    """Two outputs with or without the mixture projection, or one with the other derived
    (exactly consistent, so the projection is not asked: define-by-run keeps the study
    free of a parameter that does nothing)."""
    output = trial.suggest_categorical("output", OUTPUTS)
    if output == "one":
        return {"output": "one", "mixture_consistent": False}
    return {"output": "both",
            "mixture_consistent": trial.suggest_categorical("mixture_consistent", (True, False))}


def start_points(max_params: int | None) -> list[dict]:
    """Where the search starts: the `small` preset with the recipe's own learning rate and
    batch size (TrainConfig's defaults, results/2026-12-03-time-to-quality), shrunk to the
    budget before Optuna gets it, so that the enqueued point is the config that trains. A
    trial that is known to train well gives TPE something to build on from the first
    result, instead of only its random start-up guesses. Keys are the suggestion names."""
    small = PRESETS["small"]
    model = {name: getattr(small, name) for name in (
        "base_filters", "depth", "enc_convs", "dec_convs", "decoder_width_mult",
        "depthwise_head", "block", "upsample", "attention_gates", "output",
        "mixture_consistent")}
    recipe = TrainConfig()
    return [{**fit_budget(model, max_params), "lr": recipe.lr, "batch_size": recipe.batch_size,
             "loss": "mse"}]


def shrink_steps(model: dict):
    """Ever smaller variants of `model`, down to SMALLEST: first a standard-width decoder,
    then narrower, then fewer convolutions and steps, then the cheapest levers."""
    while model["decoder_width_mult"] > 1:
        model = {**model, "decoder_width_mult": model["decoder_width_mult"] // 2}
        yield model
    for width in sorted((w for w in BASE_FILTERS if w < model["base_filters"]), reverse=True):
        model = {**model, "base_filters": width}
        yield model
    for axis in ("dec_convs", "enc_convs", "depth"):
        while model[axis] > 1:
            model = {**model, axis: model[axis] - 1}
            yield model
    model = {**model, "depthwise_head": False}
    yield model
    for axis, cheapest in CHEAPEST_LEVERS.items():
        if model[axis] != cheapest:
            model = {**model, axis: cheapest}
            if axis == "output":
                model["mixture_consistent"] = False
            yield model


def fit_budget(model: dict, max_params: int | None) -> dict:
    """Over the parameter budget: shrink the model until it fits (SMALLEST always fits:
    config.py checks that). For the start point: a suggestion over the budget is not shrunk
    but refused (StudySearch.suggest), so that Optuna learns what was trained."""
    if max_params is None or params_of(UNetConfig(**model)) <= max_params:
        return model
    for smaller in shrink_steps(model):
        if params_of(UNetConfig(**smaller)) <= max_params:
            return smaller
    return smaller  # SMALLEST, which fits: config.py refuses a --max-params below it


def space(trial: optuna.Trial, constants: dict, max_params: int | None = None) -> dict:
    """The define-by-run function for OptunaSearch (bind `constants`, the fixed train
    settings, with functools.partial, which pickles with the experiment). Returns exactly
    what Optuna suggested: a suggestion over the parameter budget is refused by the
    searcher (sweep/study_search.py), never repaired here. `max_params` is bound only in
    sweeps begun before that (their pickled searcher lacks the budget): resumed, they go on
    shrinking suggestions as they began."""
    model = suggest_model(trial)
    if max_params is not None:
        model = fit_budget(model, max_params)
    lr = trial.suggest_float("lr", 3e-4, 1e-2, log=True)
    batch_size = trial.suggest_categorical("batch_size", BATCH_SIZES)
    loss = trial.suggest_categorical("loss", LOSSES)
    # batch_norm is fixed, but named so that the report shows it beside the searched axes.
    return {**model, "batch_norm": True, "lr": lr, "batch_size": batch_size, "loss": loss,
            **constants}


def model_params(config: dict) -> int:
    """The parameter count of a config's model."""
    return params_of(split_config(config)[0])

