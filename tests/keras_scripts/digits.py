"""A Keras softmax classifier for the 8x8 digits with BatchNormalization and Dropout,
ported by changing the import.

Quality bar: held-out accuracy >= 0.95 (Keras gets about 0.97 here).
"""

import gpunn as keras
from gpunn import layers
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

digits = load_digits()
X = digits.images.astype("float32") / 16.0  # (1797, 8, 8)
y = keras.utils.to_categorical(digits.target, num_classes=10)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, stratify=digits.target, random_state=0)

keras.utils.set_random_seed(1)
model = keras.Sequential([
    keras.Input(shape=(8, 8)),
    layers.Flatten(),
    layers.Dense(128),
    layers.BatchNormalization(),
    layers.Activation("relu"),
    layers.Dropout(0.25),
    layers.Dense(64, activation="relu"),
    layers.Dropout(0.25),
    layers.Dense(10, activation="softmax"),
])
model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.003), loss="categorical_crossentropy", metrics=["accuracy"])
model.fit(X_train, y_train, epochs=25, batch_size=32, validation_split=0.1, verbose=0)
loss, accuracy = model.evaluate(X_test, y_test, verbose=0)
print(f"test accuracy: {accuracy:.4f}")
assert accuracy >= 0.95, accuracy
