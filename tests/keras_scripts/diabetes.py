"""A Keras regressor for the diabetes data built with model.add and L2 regularisation,
ported by changing the import.

Quality bar: held-out R^2 >= 0.40 (linear least squares gets 0.45 on this split;
the data is small and noisy).
"""

import numpy as np

import gpunn as keras
from gpunn import layers, regularizers
from sklearn.datasets import load_diabetes
from sklearn.model_selection import train_test_split

X, y = load_diabetes(return_X_y=True)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=42)

normalizer = layers.Normalization()
normalizer.adapt(X_train)

keras.utils.set_random_seed(2)
model = keras.models.Sequential()
model.add(keras.Input(shape=(X.shape[1],)))
model.add(normalizer)
model.add(layers.Dense(32, activation="relu", kernel_regularizer=regularizers.L2(1e-3)))
model.add(layers.Dense(16, activation="relu", kernel_regularizer=regularizers.L2(1e-3)))
model.add(layers.Dense(1))
model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.01), loss="mse", metrics=["mae"])
model.fit(X_train, y_train, epochs=150, batch_size=32, validation_split=0.1, verbose=0,
          callbacks=[keras.callbacks.EarlyStopping(monitor="val_loss", patience=20, restore_best_weights=True)])
pred = model.predict(X_test, verbose=0)[:, 0]
r2 = 1 - np.sum((y_test - pred) ** 2) / np.sum((y_test - y_test.mean()) ** 2)
print(f"test R^2: {r2:.4f}  MAE: {np.mean(np.abs(y_test - pred)):.1f}")
assert r2 >= 0.40, r2
