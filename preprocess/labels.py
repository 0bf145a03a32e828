"""The label schema: mask status, gender, age group and the 18-class code.

This is the only place that knows how a file name or a folder field becomes a number. Every other
module (crop, datasets, metrics, reports) calls it, so a label can never depend on a sort order.

>>> encode(mask=2, gender=1, age_group=0)
15
>>> decode(15)
(2, 1, 0)
>>> age_group(59), age_group(60), age_group(57, old=58), age_group(58, old=58)
(1, 2, 1, 2)
"""
from __future__ import annotations

UNKNOWN = -1

MASK_NAMES = ("wear", "incorrect", "not wear")
GENDER_NAMES = ("male", "female")
AGE_NAMES = ("<30", "30-old", ">=old")
TASKS = {"mask": MASK_NAMES, "gender": GENDER_NAMES, "age": AGE_NAMES}
NUM_CLASSES = len(MASK_NAMES) * len(GENDER_NAMES) * len(AGE_NAMES)  # 18

YOUNG = 30
DEFAULT_OLD = 60

# The seven file stems of a competition person folder, in their canonical order.
MASK_FILES = {
    "mask1": 0, "mask2": 0, "mask3": 0, "mask4": 0, "mask5": 0,
    "incorrect_mask": 1,
    "normal": 2,
}
GENDERS = {"male": 0, "female": 1}


def age_group(age: int, old: int = DEFAULT_OLD) -> int:
    """0 for age < 30, 1 for 30 <= age < old, 2 for age >= old; -1 for an unknown age."""
    if age is None or age < 0:
        return UNKNOWN
    if not YOUNG < old:
        raise ValueError(f"the old-age threshold must be above {YOUNG}, got {old}")
    if age < YOUNG:
        return 0
    return 1 if age < old else 2


def encode(mask: int, gender: int, age_group: int) -> int:
    """The 18-class code 6*mask + 3*gender + age_group; -1 when any part is unknown."""
    if UNKNOWN in (mask, gender, age_group):
        return UNKNOWN
    if not (0 <= mask < 3 and 0 <= gender < 2 and 0 <= age_group < 3):
        raise ValueError(f"label parts out of range: mask={mask} gender={gender} age_group={age_group}")
    return 6 * mask + 3 * gender + age_group


def decode(label: int) -> tuple[int, int, int]:
    """(mask, gender, age_group) of an 18-class code."""
    if not 0 <= label < NUM_CLASSES:
        raise ValueError(f"label must be in 0..{NUM_CLASSES - 1}, got {label}")
    return task_parts(label)


def task_parts(label):
    """(mask, gender, age_group) of 18-class codes: an int, a numpy array or a torch tensor (unchecked,
    vectorised; `decode` checks one code). The inverse of `encode`, and the only other place that
    knows the layout."""
    return label // 6, (label // 3) % 2, label % 3


def combine_tasks(mask, gender, age):
    """Per-task scores (..., 3), (..., 2), (..., 3) → (..., 18) with score[encode(m, g, a)] =
    mask[m] + gender[g] + age[a]. Works on numpy arrays and torch tensors alike (log-probabilities
    in, log-probabilities of independent tasks out)."""
    full = mask[..., :, None, None] + gender[..., None, :, None] + age[..., None, None, :]
    return full.reshape(*full.shape[:-3], NUM_CLASSES)


def age_names(old: int = DEFAULT_OLD) -> tuple[str, str, str]:
    return ("<30", f"30-{old - 1}", f">={old}")


def class_names(old: int = DEFAULT_OLD) -> list[str]:
    """Readable names of the 18 classes, e.g. 'wear/female/30-59'."""
    ages = age_names(old)
    return [f"{MASK_NAMES[m]}/{GENDER_NAMES[g]}/{ages[a]}" for m, g, a in map(decode, range(NUM_CLASSES))]


def mask_of_file(stem: str) -> int | None:
    """Mask status of a competition file stem (`mask3`, `incorrect_mask`, `normal`); None if it is none of the seven."""
    return MASK_FILES.get(stem)


def gender_of(word: str) -> int | None:
    return GENDERS.get(word.lower())
