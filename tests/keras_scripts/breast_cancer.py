"""A Keras binary classifier (the README's), ported by changing the import.

Quality bar: held-out accuracy >= 0.94 (Keras gets about 0.96-0.98 here).
"""

import gpunn as keras
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

X, y = load_breast_cancer(return_X_y=True)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, stratify=y, random_state=0)
scaler = StandardScaler().fit(X_train)
X_train, X_test = scaler.transform(X_train), scaler.transform(X_test)

keras.utils.set_random_seed(0)
model = keras.Sequential([
    keras.Input(shape=(X_train.shape[1],)),
    keras.layers.Dense(64, activation="relu"),
    keras.layers.Dense(1, activation="sigmoid"),
])
model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
model.summary()
history = model.fit(X_train, y_train, epochs=30, batch_size=32, validation_split=0.1, verbose=0,
                    callbacks=[keras.callbacks.EarlyStopping(patience=5, restore_best_weights=True)])
loss, accuracy = model.evaluate(X_test, y_test, verbose=0)
print(f"test accuracy: {accuracy:.4f}")
assert accuracy >= 0.94, accuracy
