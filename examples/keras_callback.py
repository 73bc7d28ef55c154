"""A tiny Keras 3 model on the torch backend reported by tensorpulse; `--nan-step N` breaks a weight
at optimizer step N.

    tensorpulse broker --port 9092 &  tensorpulse stream --bootstrap 127.0.0.1:9092 &
    python examples/keras_callback.py --nan-step 20            # ExplodingTensor fires at step 20
    tensorpulse alerts --bootstrap 127.0.0.1:9092

Needs `pip install 'tensorpulse[keras]'` and torch; the backend is chosen before keras is imported.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tensorpulse.producers.keras import TensorPulseCallback  # noqa: E402


class BreakAWeight(keras.callbacks.Callback):
    def __init__(self, step: int | None) -> None:
        super().__init__()
        self.step = step

    def on_train_batch_begin(self, batch, logs=None):
        if int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)) == self.step:
            kernel = self.model.get_layer("hidden").kernel
            value = keras.ops.convert_to_numpy(kernel)
            value[0, 0] = np.nan
            kernel.assign(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--job", default="keras-example")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--nan-step", type=int, default=None)
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16 * args.steps, 16)).astype("float32")
    y = 2 * x[:, :1] + 0.1 * rng.normal(size=(16 * args.steps, 1)).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(32, activation="relu", name="hidden"),
            keras.layers.Dense(1, name="out"),
        ]
    )
    model.compile(keras.optimizers.SGD(0.01), "mse", metrics=["mae"])  # loss and mae become scalars
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=1,
        validation_split=0.1,  # one eval record at the end of the epoch
        callbacks=[BreakAWeight(args.nan_step), TensorPulseCallback(args.job, args.bootstrap)],
        verbose=0,
    )


if __name__ == "__main__":
    main()
