"""A Keras 3 wine classifier written with the functional API and a user callback in Keras's own
style (``logs`` as a required argument, the older ``on_batch_end`` hook), checkpointing the best
epoch and reloading it; ported by changing the import.

Quality bar: the reloaded best checkpoint scores held-out accuracy >= 0.94 (Keras 3 on the torch
backend gets 0.96-0.98 here), and the callback saw every batch.
"""

import os
import tempfile

import numpy as np
import gpunn as keras
from gpunn import layers
from sklearn.datasets import load_wine
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

X, y = load_wine(return_X_y=True)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.3, stratify=y, random_state=1)
scaler = StandardScaler().fit(X_train)
X_train, X_test = scaler.transform(X_train), scaler.transform(X_test)


class BatchLosses(keras.callbacks.Callback):
    def on_train_begin(self, logs):
        self.losses = []

    def on_batch_end(self, batch, logs):
        self.losses.append(logs["loss"])


keras.utils.set_random_seed(2)
inputs = keras.Input(shape=(X.shape[1],))
x = layers.Dense(32, activation="relu", kernel_regularizer=keras.regularizers.l2(1e-3))(inputs)
x = layers.Dropout(0.2)(x)
x = layers.Dense(16, activation="relu")(x)
outputs = layers.Dense(3, activation="softmax")(x)
model = keras.Model(inputs=inputs, outputs=outputs, name="wine")

model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.01), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
checkpoint = os.path.join(tempfile.mkdtemp(), "best.keras")
batches = BatchLosses()
history = model.fit(
    X_train, y_train, epochs=40, batch_size=16, validation_split=0.2, verbose=0,
    callbacks=[
        batches,
        keras.callbacks.ModelCheckpoint(checkpoint, monitor="val_loss", save_best_only=True),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=8, restore_best_weights=True),
    ],
)
steps = -(-int(len(X_train) * 0.8) // 16)  # validation_split keeps the first floor(n * 0.8) rows
assert len(batches.losses) == len(history.history["loss"]) * steps, (len(batches.losses), steps)
best = keras.models.load_model(checkpoint)
results = best.evaluate(X_test, y_test, verbose=0, return_dict=True)
predicted = np.argmax(best.predict(X_test, verbose=0), axis=1)
assert abs(np.mean(predicted == y_test) - results["accuracy"]) < 1e-6
print(f"test accuracy: {results['accuracy']:.4f}")
assert results["accuracy"] >= 0.94, results
