"""The ``Layer`` base class every gpunn layer derives from.

A model keeps all of its layers' weights in one flat parameter buffer (and
their gradients in a flat gradient buffer of the same layout); a layer's
weights are views into them.  A layer describes its weights with
:meth:`Layer.weight_specs` -- name, shape, initializer, and whether the
optimizer may train it (BatchNormalization's moving statistics may not) --
and the base class does the rest: views, initialization, ``get_weights`` /
``set_weights``, ``trainable_weights`` / ``non_trainable_weights`` and the
parameter count.

The computation of a layer is two methods side by side: ``call`` (forward,
writing its output into a preallocated buffer) and ``backward`` (writing
dL/dx and the gradients of its weights).  Per-batch scratch a layer needs
between the two (a dropout mask, the normalised inputs) comes from
:meth:`Layer.make_buffers`, allocated once per batch size by the trainer.

Every array is 2-D (batch, features): the layers of an MLP act on feature
vectors (``Flatten`` maps an n-D sample to one vector at the model's input).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import threading
import weakref

import numpy as np

from gpunn import activations, checks, initializers
from gpunn.config import floatx


#: Per thread: None, or the flat gradient buffer that :meth:`Layer.gradient` views instead of
#: the model's own while a row shard of a training batch runs (see :func:`gradients_into`).
_GRADIENT_TARGET = threading.local()


@contextlib.contextmanager
def gradients_into(flat):
    """On this thread, within the block, every layer's gradient views point into ``flat`` (P,),
    a buffer laid out as the model's flat gradients, instead of into the model's own; None
    keeps the model's.  The trainer runs each row shard of a batch but the first this way
    and adds the shards' buffers before the update."""
    previous = getattr(_GRADIENT_TARGET, "flat", None)
    _GRADIENT_TARGET.flat = flat
    try:
        yield
    finally:
        _GRADIENT_TARGET.flat = previous


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One weight of a layer: the attribute holding it, its shape, how it starts,
    and whether the optimizer trains it (False for running statistics)."""

    attr: str
    shape: tuple
    initializer: object = "zeros"
    trainable: bool = True

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def input_shape_argument(input_shape, input_dim, owner):
    """The feature count declared by Keras 2's ``input_shape=(n,)`` or ``input_dim=n`` (None if neither)."""
    if input_shape is not None:
        if isinstance(input_shape, (int, np.integer)) and not isinstance(input_shape, bool):
            input_shape = (input_shape,)
        if not isinstance(input_shape, (tuple, list)) or not input_shape:
            raise ValueError(f"input_shape: expected a tuple such as (n_features,), got {input_shape!r} for layer {owner!r}")
        dims = [checks.positive_int(d, "input_shape") for d in input_shape]
        return int(np.prod(dims)), tuple(dims)
    if input_dim is not None:
        n = checks.positive_int(input_dim, "input_dim")
        return n, (n,)
    return None, None


class Layer:
    """Base class of gpunn's layers (see the module docstring for the protocol).

    ``trainable``: False freezes the layer -- its weights get no update and
    no regularisation, and it reports them as ``non_trainable_weights``.
    ``activation``: the elementwise function the layer ends with (linear for
    most layers); the loss may fold a sigmoid/softmax into itself.
    """

    _counter: dict[str, int] = {}
    #: whether the layer's output size differs from its input size
    changes_width = False
    #: whether a training step with this layer can be captured as a CUDA graph and replayed: False
    #: for layers whose per-step values do not come from device memory (e.g. random draws keyed
    #: on the host by ``TrainingPhase.step``; a replay would repeat the captured draw)
    graph_safe = True
    #: whether training treats each row of a batch on its own: ``call`` and ``backward`` on rows
    #: [lo, hi) of every array (and of the scratch, see :meth:`buffer_rows`) give those rows'
    #: outputs and input gradients, and weight gradients (written only through
    #: :meth:`gradient`) that add up over the rows.  A batch of such layers may be split into
    #: row shards trained on separate threads (the CPU backend does); not so with batch
    #: statistics (BatchNormalization) or random draws keyed by the host (GaussianNoise).  Draws
    #: keyed by the row's place in the batch read ``TrainingPhase.first_row`` (Dropout does).
    rows_independent = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # a subclass with its own call or backward (a user's Dense variant, say) may use the whole
        # batch: it trains whole batches unless it says otherwise itself
        if ("call" in vars(cls) or "backward" in vars(cls)) and "rows_independent" not in vars(cls):
            cls.rows_independent = False

    def __init__(self, name=None, trainable=True, input_shape=None, input_dim=None, dtype=None):
        if name is None:
            base = _snake_case(type(self).__name__)
            n = Layer._counter.get(base, 0)
            Layer._counter[base] = n + 1
            name = base if n == 0 else f"{base}_{n}"
        elif not isinstance(name, str) or not name:
            raise ValueError(f"name: expected a non-empty string, got {name!r}")
        self.name = name
        self.built = False
        self._owner = None  # weak reference to the model holding this layer
        self._trainable = checks.boolean(trainable, "trainable")
        self.input_dim, self.batch_input_shape = input_shape_argument(input_shape, input_dim, name)
        #: the float dtype this layer asked for (None: the model's); a model computes every layer
        #: in one dtype, and says so when a layer asked for another (see LayerStack)
        self.requested_dtype, self.ignored_dtype_policy = checks.layer_dtype(dtype, f"dtype (layer {name!r})")
        self.dtype_noted = False  # whether the model has warned about this layer's dtype request
        self.output_dim = None
        self.activation = activations.get(None)
        self._backend = None
        self._views: dict[str, tuple] = {}

    # -- ownership and freezing -------------------------------------------------
    def attach(self, model):
        """Record that ``model`` holds this layer.

        A layer's weights are views into its model's flat buffers, so a layer
        belongs to one model; adding it to a second raises ValueError (while
        the first model is alive).
        """
        owner = self.owner
        if owner is not None and owner is not model:
            raise ValueError(
                f"layers: layer {self.name!r} already belongs to model {owner.name!r}; gpunn layers cannot be "
                "shared between models (their weights live in one model's buffers). Use a new layer, e.g. "
                f"{type(self).__name__}.from_config(layer.get_config()), and copy weights with set_weights(get_weights())"
            )
        self._owner = weakref.ref(model)

    def detach(self):
        self._owner = None
        self.built = False
        self._views = {}

    @property
    def owner(self):
        return None if self._owner is None else self._owner()

    @property
    def dtype(self) -> str:
        """The float dtype the layer computes in: its model's (every layer of a model shares one)."""
        owner = self.owner
        if owner is not None:
            return str(owner.dtype)
        return self.requested_dtype or floatx()

    @property
    def trainable(self) -> bool:
        return self._trainable

    @trainable.setter
    def trainable(self, value):
        self._trainable = checks.boolean(value, "trainable")
        owner = self.owner
        if owner is not None:
            owner.layers_changed()

    # -- weights -------------------------------------------------------------------
    def weight_specs(self, input_dim) -> list[WeightSpec]:
        """The layer's weights for ``input_dim`` input features, in Keras's get_weights order."""
        return []

    def compute_output_dim(self, input_dim):
        """Output features for ``input_dim`` inputs (None when unknown)."""
        return input_dim

    def count_params(self):
        if self.input_dim is None:
            return None
        return sum(spec.size for spec in self.weight_specs(self.input_dim))

    def build(self, backend, input_dim, params, grads, offset, dtype, initialize=True):
        """Take views of the flat ``params``/``grads`` from ``offset``; return the new offset.

        With ``initialize`` the views are filled by the initializers.
        """
        if self.input_dim is not None and self.input_dim != input_dim:
            raise ValueError(
                f"input_dim: layer {self.name!r} was declared with {self.input_dim} inputs but receives {input_dim}"
            )
        self.input_dim = input_dim
        self.output_dim = self.compute_output_dim(input_dim)
        self._backend = backend
        self._views = {}
        for spec in self.weight_specs(input_dim):
            view = params[offset : offset + spec.size].reshape(spec.shape)
            grad = grads[offset : offset + spec.size].reshape(spec.shape)
            self._views[spec.attr] = (view, grad, offset, spec)
            if initialize:
                values = self.initial_value(spec, dtype)
                view[...] = backend.asarray(values)
            offset += spec.size
        self.built = True
        return offset

    def initial_value(self, spec, dtype):
        return initializers.initialize(spec.initializer, spec.shape, dtype, f"{spec.attr}_initializer")

    def __getattr__(self, attr):
        # Keras's attribute access to a built layer's weights: bn.moving_mean, layer.gamma, ...
        views = self.__dict__.get("_views") or {}
        if attr in views:
            return views[attr][0]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {attr!r}")

    def weight(self, attr):
        """The weight ``attr`` (a view into the model's parameters), or None before building."""
        entry = self._views.get(attr)
        return None if entry is None else entry[0]

    def gradient(self, attr):
        """The gradient of weight ``attr``: a view into the model's flat gradients (or, inside
        :func:`gradients_into`, into that buffer), or None before building."""
        entry = self._views.get(attr)
        if entry is None:
            return None
        flat = getattr(_GRADIENT_TARGET, "flat", None)
        if flat is None:
            return entry[1]
        _, _, offset, spec = entry
        return flat[offset : offset + spec.size].reshape(spec.shape)

    def weight_ranges(self):
        """``(start, stop, trains)`` of each weight in the flat buffers; ``trains`` is whether the
        optimizer updates it now (the weight is trainable and the layer is not frozen)."""
        return [(off, off + spec.size, spec.trainable and self._trainable) for _, _, off, spec in self._views.values()]

    @property
    def weights(self):
        return [entry[0] for entry in self._views.values()]

    @property
    def trainable_weights(self):
        if not self._trainable:
            return []
        return [view for view, _, _, spec in self._views.values() if spec.trainable]

    @property
    def non_trainable_weights(self):
        return [view for view, _, _, spec in self._views.values() if not (spec.trainable and self._trainable)]

    def regularized_weights(self):
        """``(regularizer, weight, gradient)`` of every regularised weight the optimizer trains."""
        return []

    def get_weights(self):
        """The layer's weights as NumPy arrays (Keras order)."""
        if not self.built:
            return []
        return [self._backend.to_numpy(w).copy() for w in self.weights]

    def set_weights(self, weights):
        if not self.built:
            raise ValueError(f"layer {self.name!r} is not built yet; build the model before set_weights")
        entries = list(self._views.values())
        if not isinstance(weights, (list, tuple)) or len(weights) != len(entries):
            names = ", ".join(spec.attr for _, _, _, spec in entries)
            got = len(weights) if isinstance(weights, (list, tuple)) else type(weights).__name__
            raise ValueError(f"weights: layer {self.name!r} expects {len(entries)} arrays ({names}), got {got}")
        for (target, _, _, spec), value in zip(entries, weights):
            value = np.asarray(value)
            if value.shape != tuple(spec.shape):
                raise ValueError(f"weights: layer {self.name!r} {spec.attr} expects shape {tuple(spec.shape)}, got {value.shape}")
            if not np.issubdtype(value.dtype, np.number):
                raise TypeError(f"weights: layer {self.name!r} {spec.attr} must be numeric, got dtype {value.dtype}")
        for (target, _, _, spec), value in zip(entries, weights):
            # as_float_array refuses finite values that would become inf in the model's dtype
            value = checks.as_float_array(value, f"weights: layer {self.name!r} {spec.attr}", target.dtype)
            target[...] = self._backend.asarray(value)

    # -- the functional API -------------------------------------------------------------
    def __call__(self, inputs, training=None, **kwargs):
        """``layer(inputs)`` on ``gpunn.Input(...)`` or another layer's output: Keras's functional
        API, a :class:`SymbolicTensor` recording this layer on the chain that
        ``gpunn.Model(inputs, outputs)`` turns into a model.  Layers compute inside a model only:
        applying one to data directly is refused (see the message)."""
        if kwargs or training is not None:
            extra = sorted(kwargs) + (["training"] if training is not None else [])
            raise TypeError(
                f"{self.name}: calling a layer takes only its input in gpunn (got {', '.join(extra)}); "
                "training behaviour is chosen by fit (training) and predict/evaluate (inference)"
            )
        if not isinstance(inputs, SymbolicTensor):
            what = type(inputs).__name__ if not hasattr(inputs, "shape") else f"an array of shape {tuple(inputs.shape)}"
            raise TypeError(
                f"inputs: gpunn layers are called on gpunn.Input(shape=...) or on another layer's output "
                f"(the functional API: model = gpunn.Model(inputs, outputs)); got {what}. To compute with a "
                "layer, put it in a model and use model.predict(x) or model(x)"
            )
        return SymbolicTensor(self, inputs)

    # -- computation -----------------------------------------------------------------
    def make_buffers(self, backend, batch, dtype, activation, training):
        """Per-batch scratch the layer keeps between ``call`` and ``backward`` (None if none)."""
        return None

    def buffer_rows(self, buffers, lo, hi):
        """Rows [lo, hi) of this layer's :meth:`make_buffers` scratch (views): None, or an
        array whose first axis is the batch (override for other scratch)."""
        if buffers is None:
            return None
        if hasattr(buffers, "shape"):
            return buffers[lo:hi]
        raise TypeError(f"layer {self.name!r}: its scratch {type(buffers).__name__} has no row views; override buffer_rows")

    def absorb(self, activation, following, following_activation):
        """The activation this layer's ``call`` applies when it also runs ``following`` (the next
        layer, running ``following_activation``) -- or None when it cannot (the default).
        ``activation`` is what this layer runs so far."""
        return None

    def call(self, backend, x, y, buffers, activation, training):
        """Forward: the layer's output for ``x`` (B, in) into ``y`` (B, out); returns ``y``."""
        raise NotImplementedError

    def backward(self, backend, x, dy, y, buffers, dx, activation):
        """Backward through :meth:`call`: weight gradients into the gradient views, dL/dx into
        ``dx`` (B, in), skipped when None.  ``dy`` (B, out) may be used as scratch."""
        raise NotImplementedError(
            f"layer {self.name!r} ({type(self).__name__}) has call() but no backward(): it predicts but cannot be "
            "trained (gpunn has no automatic differentiation; see gpunn.layer_base.Layer.backward)"
        )

    def folds(self, layer, activation) -> bool:
        """Whether this layer's training ``call``/``backward`` can also do the work of ``layer``,
        the next one, when given it as ``folded=`` (``activation``: this layer's, as trained)."""
        return False

    def activate(self, backend, z, out):
        """``out = activation(z)`` for this layer's own activation (e.g. logits to probabilities)."""
        act = self.activation
        if act.is_softmax:
            backend.softmax(z, out)
        else:
            backend.apply_activation(z, act.code, act.alpha, out)
        return out

    def output_shape_label(self):
        return f"(None, {self.output_dim if self.output_dim is not None else '?'})"

    # -- configuration -----------------------------------------------------------------
    def get_config(self):
        config = {"class_name": type(self).__name__, "name": self.name}
        if not self._trainable:  # written only when set, so older files' configs stay as they were
            config["trainable"] = False
        if self.batch_input_shape is not None:
            config["input_shape"] = list(self.batch_input_shape)
        if self.requested_dtype is not None:  # written only when given, as trainable
            config["dtype"] = self.requested_dtype
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config.pop("class_name", None)
        return cls(**config)

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r})"


class SymbolicTensor:
    """A placeholder for data in the functional API (Keras's ``KerasTensor``): ``gpunn.Input``
    is one, and ``layer(tensor)`` makes the next, remembering the layer and its input.

    ``shape``: ``(None, *sample shape)``, the sample part None where not yet known.
    """

    def __init__(self, layer=None, source=None):
        self.layer, self.source = layer, source

    def chain(self):
        """``(the Input this tensor comes from, [the layers applied to it, in order])``."""
        layers, node = [], self
        while node.layer is not None:
            layers.append(node.layer)
            node = node.source
        return node, layers[::-1]

    @property
    def shape(self):
        origin, layers = self.chain()
        return (None, stack_output_dim(layers, int(np.prod(origin.shape)))) if layers else (None, *origin.shape)

    def __repr__(self):
        origin, layers = self.chain()
        return f"<SymbolicTensor shape={self.shape}, {' -> '.join(['Input'] + [layer.name for layer in layers])}>"


def unsupported_subclass(layer) -> str | None:
    """Why ``layer``'s class cannot run in a gpunn model (a Keras-style custom layer), or None.

    gpunn has no automatic differentiation: a layer gives ``weight_specs``,
    ``call(backend, x, y, buffers, activation, training)`` and its ``backward``; Keras's
    ``build(input_shape)`` / ``call(inputs)`` written with ``keras.ops`` cannot be trained.
    """
    cls = type(layer)

    def own(method):
        return getattr(cls, method) is not getattr(Layer, method)

    def arity(method):
        return len(inspect.signature(getattr(cls, method)).parameters) - 1  # without self

    if own("build") and arity("build") < 6:
        return "defines Keras's build(input_shape)"
    if own("call") and arity("call") < 4:
        return "defines Keras's call(inputs)"
    return None  # a call() without backward() still predicts and exports; fit says what is missing


def _snake_case(name):
    out = []
    for i, ch in enumerate(name):
        if ch.isupper() and i and (not name[i - 1].isupper() or (i + 1 < len(name) and name[i + 1].islower())):
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


def stack_output_dim(layers, input_dim=None):
    """The output features of ``layers`` applied in order to ``input_dim`` inputs (None if unknown)."""
    dim = input_dim
    for layer in layers:
        dim = layer.compute_output_dim(dim)
    return dim


@dataclasses.dataclass(frozen=True)
class FusedStep:
    """Layers ``first`` .. ``last`` of a stack run as one ``call`` (and one ``backward``) of layer
    ``first`` with ``activation``: e.g. ``Dense(linear)`` then ``Activation("gelu")`` is one fused
    linear + GELU kernel.  The step reads layer ``first``'s input and writes layer ``last``'s
    output; the absorbed layers' own buffers stay unused.  ``folded``: None, or layer ``last``
    when its training work is done by layer ``first``'s call given ``folded=`` (a Dropout after a
    Dense, see :meth:`Layer.folds`); at inference such a layer is the identity."""

    first: int
    last: int
    activation: object
    folded: object = None


def fused_steps(layers, acts) -> list[FusedStep]:
    """The stack ``layers`` (each running ``acts[i]``) as fused steps: a layer absorbs the layers
    after it for as long as its ``absorb`` accepts them (see :meth:`Layer.absorb`), then folds
    the next one in when its ``folds`` accepts it."""
    steps, i = [], 0
    while i < len(layers):
        last, act = i, acts[i]
        while last + 1 < len(layers):
            folded = layers[i].absorb(act, layers[last + 1], acts[last + 1])
            if folded is None:
                break
            last, act = last + 1, folded
        dropout = None
        if last + 1 < len(layers) and layers[i].folds(layers[last + 1], act):
            last += 1
            dropout = layers[last]
        steps.append(FusedStep(i, last, act, dropout))
        i = last + 1
    return steps


class TrainingPhase:
    """The ``training`` argument of ``call`` during a training step: true, and carries the step
    number (the optimizer's update count) that keys the layer's random draws.

    ``step_array``: None, or the same number in a backend int64 array of shape (1,) (the
    training step's record, ``gpunn.training.StepRecord.step``), for device code that must
    read the current step when a captured CUDA graph is replayed.  ``first_row``: where
    the rows being run start in the batch (a row shard of it; see ``Layer.rows_independent``),
    so that draws keyed by position are those of the whole batch.
    """

    __slots__ = ("step", "step_array", "first_row")

    def __init__(self, step: int, step_array=None, first_row: int = 0):
        self.step = int(step)
        self.step_array = step_array
        self.first_row = int(first_row)

    def __bool__(self):
        return True


def reset_names():
    """Default layer names start over (``clear_session``)."""
    Layer._counter.clear()
