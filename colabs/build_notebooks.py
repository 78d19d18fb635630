"""Writes the notebooks of this folder from the cells below: `python colabs/build_notebooks.py`.

Edit the notebooks here, not in Jupyter, and re-run this script (the notebooks are
committed without outputs; tests/test_colabs.py checks they match this file and runs them).
Every notebook's first code cell holds the one path to change on Colab; tests set it, and
shrink the run, through the SIMCLR_COLAB_* environment variables.
"""

from __future__ import annotations

import pathlib
import sys

import nbformat

HERE = pathlib.Path(__file__).resolve().parent

RELEASED = """\
The released SimCLRv2 TF2 checkpoints (google-research/simclr) are SavedModels under
`gs://simclr-checkpoints-tf2/simclrv2/<kind>/<model>/saved_model/` with `<kind>` one of
`pretrained` (with a linear classifier), `finetuned_1pct`, `finetuned_10pct`,
`finetuned_100pct`, `supervised`, `distill_1pct`, `distill_10pct`, and `<model>` one of
`r50_1x_sk0`, `r50_1x_sk1`, `r50_2x_sk0`, `r50_2x_sk1`, `r101_1x_sk0`, `r101_1x_sk1`,
`r101_2x_sk0`, `r101_2x_sk1`, `r152_1x_sk0`, `r152_1x_sk1`, `r152_2x_sk0`, `r152_2x_sk1`,
`r152_3x_sk1`. They are converted to this package's Keras 3 model on the fly (nothing of the
original code is needed). `CHECKPOINT` may also be a copy of one on disk, a training
checkpoint of the original `tf2/run.py`, or a run directory of this package."""


def setup_cell(default_checkpoint: str, extra: str = "") -> str:
    return f'''\
# On Colab, install this package first (uncomment; Colab's TensorFlow 2 + Keras 3 is used):
# !pip install -q "simclr_tf @ git+https://github.com/<owner>/simclr_tf"
import os

# The one path to change: a released checkpoint (see above), or your own.
CHECKPOINT = os.environ.get("SIMCLR_COLAB_CHECKPOINT", "{default_checkpoint}")
WORK_DIR = os.environ.get("SIMCLR_COLAB_WORK_DIR", "/tmp/simclr_colab")
SMOKE = os.environ.get("SIMCLR_COLAB_SMOKE") == "1"  # the tests: a few steps on a few images

# Images: the 5,000 MNIST digits shipped with the package (no download), a TFDS name such
# as "tf_flowers" (set the splits: it only has "train"), or "folder:/path/to/images".
DATASET = "mnist5k"
TRAIN_SPLIT, EVAL_SPLIT = ("train[:256]", "validation[:64]") if SMOKE else ("train", "validation")
{extra}'''


IMPORTS = """\
from absl import logging
import matplotlib.pyplot as plt
import numpy as np
import tensorflow as tf

from simclr_tf import convert, data, export, losses
from simclr_tf.models import SimCLRModel
from simclr_tf.train import train_and_evaluate

logging.set_verbosity(logging.WARNING)
os.makedirs(WORK_DIR, exist_ok=True)
print("TensorFlow", tf.__version__)"""

EVAL_BATCHES = """\
def eval_batches(image_size, batch_size=8):
    \"\"\"Batches of {"image": (B, S, S, 3) in [0, 1], "label": (B,)} from the eval split.\"\"\"
    return data.build_dataset(
        data.get_source(DATASET), split=EVAL_SPLIT, batch_size=batch_size, is_training=False,
        num_views=1, image_size=image_size, color_jitter_strength=0.0, use_blur=False)"""


def finetuning() -> list:
    return [
        ("markdown", f"""\
# Fine-tuning a SimCLRv2 checkpoint

Loads a SimCLRv2 checkpoint, fine-tunes a new linear classifier on a frozen network, then
the whole network, and evaluates both; the result is also exported as a SavedModel that
plain TensorFlow can fine-tune further (`trainable_variables` holds every weight).

{RELEASED}"""),
        ("code", setup_cell(
            "gs://simclr-checkpoints-tf2/simclrv2/pretrained/r50_1x_sk0/saved_model/",
            "STEPS_HEAD, STEPS_ALL = (2, 2) if SMOKE else (500, 500)\n"
            "BATCH_SIZE = 16 if SMOKE else 64\n",
        )),
        ("code", IMPORTS),
        ("markdown", """\
## 1. Convert the checkpoint

Writes our checkpoint (`ckpt-<step>`), its `config.json` and `conversion.json` (which
original variable went where). The original's classifier is left out: a new one is
trained for this dataset's classes. Same as
`python tools/convert_checkpoint.py --source=... --output_dir=... --drop_supervised_head`."""),
        ("code", """\
checkpoint, pretrained = convert.prepare_checkpoint(
    CHECKPOINT, os.path.join(WORK_DIR, "converted"), supervised_head=False)
print(checkpoint)
print(pretrained.model)"""),
        ("markdown", """\
## 2. A linear classifier on the frozen network

`fine_tune_after_block=4` freezes the whole ResNet (its batch norm runs in inference mode):
only the new classifier on the pooled features trains. `train_and_evaluate` is what
`python run.py --train_mode=finetune --checkpoint=...` runs."""),
        ("code", """\
base = pretrained.replace(
    data={"dataset": DATASET, "train_split": TRAIN_SPLIT, "eval_split": EVAL_SPLIT},
    train={"train_mode": "finetune", "mode": "train_then_eval", "train_batch_size": BATCH_SIZE,
           "eval_batch_size": 64, "knn_eval": False, "log_every_steps": 50},
    optim={"optimizer": "momentum", "warmup_epochs": 0, "weight_decay": 0.0},
)
head_dir = os.path.join(WORK_DIR, "linear_head")
linear = train_and_evaluate(base.replace(
    model={"fine_tune_after_block": 4},
    train={"checkpoint": checkpoint, "train_steps": STEPS_HEAD, "keep_hub_module_max": 0},
    optim={"learning_rate": 1.0}), head_dir)
print(linear)"""),
        ("markdown", """\
## 3. The whole network

Starts from step 2's run, so the classifier starts trained, and updates every weight."""),
        ("code", """\
full_dir = os.path.join(WORK_DIR, "whole_network")
full = train_and_evaluate(base.replace(
    model={"fine_tune_after_block": -1},
    train={"checkpoint": head_dir, "train_steps": STEPS_ALL, "keep_hub_module_max": 1},
    optim={"learning_rate": 0.1}), full_dir)
for name, result in (("linear classifier", linear), ("whole network", full)):
    print(f"{name:>17}: top-1 {result['eval/label_top_1_accuracy']:.3f}, "
          f"top-5 {result['eval/label_top_5_accuracy']:.3f}")"""),
        ("markdown", """\
## 4. The exported SavedModel, fine-tuned with plain TensorFlow

Training wrote `<model_dir>/saved_model/<step>/`. Unlike the original's exports, its
`trainable_variables` are all the network's weights and `trainable=True` gives gradients
for all of them."""),
        ("code", EVAL_BATCHES + """

saved_model_dir = os.path.join(full_dir, "saved_model", str(export.exported_steps(full_dir)[-1]))
loaded = tf.saved_model.load(saved_model_dir)
batch = next(iter(eval_batches(pretrained.model.image_size)))
with tf.GradientTape() as tape:
    logits = loaded(batch["image"], trainable=True)["logits_sup"]
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(batch["label"], logits))
grads = tape.gradient(loss, loaded.trainable_variables)
for variable, grad in zip(loaded.trainable_variables, grads):
    variable.assign_sub(0.01 * grad)
print(f"{len(loaded.trainable_variables)} trainable variables, "
      f"{sum(g is not None for g in grads)} with a gradient; loss {float(loss):.3f}")
assert all(g is not None for g in grads)"""),
    ]


def load_and_inference() -> list:
    return [
        ("markdown", f"""\
# Load a SimCLRv2 checkpoint and classify images

Loads a checkpoint into our Keras model, exports it as a SavedModel, and shows the top-5
classes the SavedModel predicts for a few images.

{RELEASED}

A fine-tuned checkpoint (`finetuned_*`, `supervised`, `distill_*`) predicts the 1,000
ImageNet classes: on this notebook's digits its guesses are ImageNet objects."""),
        ("code", setup_cell("gs://simclr-checkpoints-tf2/simclrv2/finetuned_100pct/r50_1x_sk0/saved_model/")),
        ("code", IMPORTS),
        ("markdown", "## 1. Load the checkpoint into our Keras model"),
        ("code", """\
model, config = convert.load_pretrained(CHECKPOINT)
num_classes = model.supervised_head.num_classes
print(config.model)
print(f"{model.count_params() / 1e6:.1f}M parameters, {num_classes} classes")"""),
        ("markdown", """\
## 2. Export it as a SavedModel and load that

`loaded(images, trainable=False)` returns the named outputs (`initial_conv`, ...,
`block_group4`, `final_avg_pool`, `proj_head_output`, `logits_sup`); TF Serving uses
its `serving_default` signature."""),
        ("code", """\
saved_model_dir = export.write_saved_model(model, os.path.join(WORK_DIR, "inference", "saved_model"))
loaded = tf.saved_model.load(saved_model_dir)
print(sorted(loaded.signatures["serving_default"].structured_outputs))"""),
        ("markdown", "## 3. Predict on a few images"),
        ("code", EVAL_BATCHES + """

source = data.get_source(DATASET)
if num_classes == source.num_classes:
    class_names = source.class_names
elif num_classes == 1000:  # WordNet ids, as TFDS knows them offline
    import tensorflow_datasets as tfds
    class_names = tfds.builder("imagenet2012").info.features["label"].names
else:
    class_names = [f"class {i}" for i in range(num_classes)]

batch = next(iter(eval_batches(config.model.image_size, batch_size=64)))
pick = np.linspace(0, len(batch["label"]) - 1, 8).astype(int)  # spread over the (ordered) split
batch = {key: tf.gather(value, pick) for key, value in batch.items()}
outputs = loaded(batch["image"], trainable=False)
# The SavedModel computes what the Keras model does.
np.testing.assert_allclose(outputs["logits_sup"], model(batch["image"])["logits_sup"], rtol=1e-4, atol=1e-4)
top5 = tf.math.top_k(tf.nn.softmax(outputs["logits_sup"]), k=min(5, num_classes))"""),
        ("code", """\
n = len(batch["image"])
fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 4.2))
for i, ax in enumerate(axes):
    ax.imshow(batch["image"][i].numpy())
    ax.axis("off")
    lines = [f"{class_names[int(c)][:14]} {float(p):.2f}" for p, c in zip(top5.values[i], top5.indices[i])]
    ax.set_title(f"label: {source.class_names[int(batch['label'][i])]}\\n" + "\\n".join(lines), fontsize=8)
plt.tight_layout()
plt.show()"""),
    ]


def distillation_self_training() -> list:
    return [
        ("markdown", f"""\
# Distillation / self-training on unlabeled images

A fine-tuned SimCLRv2 model (the teacher) labels images with its class probabilities; a
smaller network (the student) learns them: no labels are used. The loss is the paper's
`-sum_y P_teacher(y|x; T) log P_student(y|x; T)` (`simclr_tf.losses.distillation_loss`).
The student predicts the teacher's classes (1,000 ImageNet classes for the released models).

{RELEASED}

When the teacher's classes are your dataset's (e.g. you fine-tuned it with `run.py`), the
same runs from the command line:
`python run.py --train_mode=distill --teacher_checkpoint=<converted or fine-tuned run> ...`."""),
        ("code", setup_cell(
            "gs://simclr-checkpoints-tf2/simclrv2/finetuned_10pct/r50_1x_sk0/saved_model/",
            "STEPS = 3 if SMOKE else 1000\n"
            "BATCH_SIZE = 16 if SMOKE else 64\n"
            "TEMPERATURE = 1.0\n",
        )),
        ("code", IMPORTS),
        ("markdown", "## 1. The teacher, frozen"),
        ("code", """\
teacher, config = convert.load_pretrained(CHECKPOINT)
teacher.trainable = False
num_classes = teacher.supervised_head.num_classes
image_size = config.model.image_size
print(config.model, f"\\n{teacher.count_params() / 1e6:.1f}M parameters")"""),
        ("markdown", """\
## 2. The student: a ResNet-18 (a quarter of the width in the smoke test)"""),
        ("code", """\
student = SimCLRModel(num_classes, resnet_depth=18, width_multiplier=0.25 if SMOKE else 1,
                      cifar_stem=image_size <= 32, proj_head_mode="none")
student.build((None, image_size, image_size, 3))
print(f"student: {student.count_params() / 1e6:.1f}M parameters")"""),
        ("markdown", """\
## 3. Distill on unlabeled, augmented images (random crop and flip)"""),
        ("code", """\
unlabeled = data.build_dataset(
    data.get_source(DATASET), split=TRAIN_SPLIT, batch_size=BATCH_SIZE, is_training=True,
    num_views=1, image_size=image_size, color_jitter_strength=0.0, use_blur=False)
optimizer = tf.keras.optimizers.SGD(learning_rate=0.05, momentum=0.9, nesterov=True)

@tf.function
def distill_step(images):
    teacher_logits = teacher(images, training=False)["logits_sup"]
    with tf.GradientTape() as tape:
        student_logits = student(images, training=True)["logits_sup"]
        loss, metrics = losses.distillation_loss(
            teacher_logits=teacher_logits, student_logits=student_logits, temperature=TEMPERATURE)
    grads = tape.gradient(loss, student.trainable_variables)
    optimizer.apply_gradients(zip(grads, student.trainable_variables))
    return metrics

for step, batch in enumerate(unlabeled.take(STEPS), start=1):  # labels are not used
    metrics = distill_step(batch["image"])
    if step % max(1, STEPS // 10) == 0 or step == STEPS:
        print(f"step {step}: loss {float(metrics['distill_loss']):.4f}, "
              f"agreement with the teacher {float(metrics['distill_agreement']):.3f}")"""),
        ("markdown", "## 4. How often the student agrees with the teacher on held-out images"),
        ("code", EVAL_BATCHES + """

agree = total = correct_teacher = correct_student = 0
for batch in eval_batches(image_size, batch_size=64):
    t = tf.argmax(teacher(batch["image"])["logits_sup"], -1, output_type=tf.int32)
    s = tf.argmax(student(batch["image"])["logits_sup"], -1, output_type=tf.int32)
    agree += int(tf.reduce_sum(tf.cast(t == s, tf.int32)))
    correct_teacher += int(tf.reduce_sum(tf.cast(t == batch["label"], tf.int32)))
    correct_student += int(tf.reduce_sum(tf.cast(s == batch["label"], tf.int32)))
    total += len(t)
print(f"student-teacher agreement: {agree / total:.3f} on {total} images")
if num_classes == data.get_source(DATASET).num_classes:  # the teacher knows these labels
    print(f"top-1: teacher {correct_teacher / total:.3f}, student {correct_student / total:.3f}")"""),
    ]


NOTEBOOKS = {
    "finetuning.ipynb": finetuning,
    "load_and_inference.ipynb": load_and_inference,
    "distillation_self_training.ipynb": distillation_self_training,
}


def build(name: str) -> nbformat.NotebookNode:
    """The notebook `name`, without outputs."""
    make = {"markdown": nbformat.v4.new_markdown_cell, "code": nbformat.v4.new_code_cell}
    notebook = nbformat.v4.new_notebook(cells=[make[kind](text) for kind, text in NOTEBOOKS[name]()])
    notebook.metadata.update(
        kernelspec={"name": "python3", "display_name": "Python 3", "language": "python"},
        language_info={"name": "python"},
        colab={"provenance": []},
    )
    for i, cell in enumerate(notebook.cells):
        cell["id"] = f"cell-{i}"  # stable ids: rebuilding gives the same file
    return notebook


def main() -> int:
    for name in NOTEBOOKS:
        nbformat.write(build(name), HERE / name)
        print(f"wrote {HERE / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
