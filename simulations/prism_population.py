"""Semi-synthetic PRISM-shaped benchmark with a known low-rank reward (`lore-fed synth`).

Real text (simulations.text_pool), real embeddings, synthetic people. Written in the exact PRISM release schema
(lore_core.prism_schema; docs/prism-and-embeddings.md §1, §6), so the whole pipeline (prepare -> embed -> train)
runs on it unchanged, and the hidden truth goes to a separate `ground_truth.npz`, never into the JSONL.

Truth. phi = e(history, response) is the pair embedding the pipeline itself computes (context = the user turns and
chosen replies up to this turn's prompt). Basis A* (K, D): random orthonormal combinations of the top principal
directions of the within-turn deviations of the turn-0 embeddings (what pair differences see), each row scaled to a
reward std of 1 over those deviations. User u: w_u ~ Dirichlet(heterogeneity * 1_K), r_u = w_u . A* (phi - center).
Slider: score = clip(round(b_u + c_u (r_u + eps)), 1, 100), b_u ~ U(45, 75), c_u ~ U(8, 25), eps ~ N(0, noise^2).
Then P(a scored above b) = Phi((r_a - r_b) / (sqrt(2) noise)) ~ sigmoid(logit_scale (r_a - r_b)) with
logit_scale = 1.702 / (sqrt(2) noise): `logit_true = logit_scale * w_u . (basis @ diff)`.

Structure. Conversations are generated turn by turn for the whole population at once: all turn-t responses are
embedded in one call (their contexts depend on the turn t-1 choices), scored, and the argmax (random tie-break) is
chosen. Turn 0: 2-4 candidates from distinct models; later turns: A/B from the turn-0 chosen model, now and then
identical (both chosen); now and then an "EMPTY STRING" response.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from lore_core.atomic_io import atomic_save_npz, atomic_write_text
from lore_core.setting_names import SettingError, as_field, setting
from lore_core.prism_schema import (
    GROUND_TRUTH_FILE,
    CONVERSATION_SCHEMA,
    CONVERSATIONS_FILE,
    EMPTY_RESPONSE,
    SCORE_MAX,
    SCORE_MIN,
    SURVEY_FILE,
    SURVEY_SCHEMA,
    UTTERANCES_FILE,
    Conversation,
    Response,
    Turn,
    derive_utterances,
)
from simulations.text_pool import CANDIDATES_PER_EXCHANGE, TextPool, build_text_pool

# P(a user has n conversations), n = 0..7: PRISM's 104/1,500 survey-only users, mean ~5.3 (note §6.2).
PRISM_CONVERSATIONS = (0.07, 0.02, 0.03, 0.04, 0.05, 0.09, 0.60, 0.10)
TURN0_COUNT_PROBS = {4: 0.78, 3: 0.19, 2: 0.03}  # responses to the opening prompt (PRISM mean 3.75)
TURN_STOP_PROB = 0.42  # turns = 1 + Geometric(0.42), capped at max_turns: PRISM mean 3.4
SLIDER_BIAS = (45.0, 75.0)
SLIDER_SCALE = (8.0, 25.0)
PROBIT_TO_LOGIT = 1.702  # Phi(x) ~ sigmoid(1.702 x)
PLANTED_BASES = (0, 1)  # the planted group's prior leans toward these two bases

# (model_name, model_provider): the 21 PRISM models.
MODELS = (
    ("gpt-4", "openai"), ("gpt-4-1106-preview", "openai"), ("gpt-3.5-turbo", "openai"),
    ("claude-2", "anthropic"), ("claude-2.1", "anthropic"), ("claude-instant-1", "anthropic"),
    ("command", "cohere"), ("command-light", "cohere"), ("command-nightly", "cohere"),
    ("models/chat-bison-001", "google"), ("luminous-extended-control", "aleph"),
    ("luminous-supreme-control", "aleph"), ("meta-llama/Llama-2-7b-chat-hf", "huggingface_api"),
    ("meta-llama/Llama-2-13b-chat-hf", "huggingface_api"), ("meta-llama/Llama-2-70b-chat-hf", "huggingface_api"),
    ("mistralai/Mistral-7B-Instruct-v0.1", "huggingface_api"), ("HuggingFaceH4/zephyr-7b-beta", "huggingface_api"),
    ("tiiuae/falcon-7b-instruct", "huggingface_api"), ("google/flan-t5-xxl", "huggingface_api"),
    ("OpenAssistant/oasst-sft-4-pythia-12b-epoch-3.5", "huggingface_api"), ("lmsys/vicuna-13b-v1.5", "huggingface_api"),
)  # fmt: skip
CONVERSATION_TYPES = (("unguided", 3113), ("values guided", 2460), ("controversy guided", 2438))
ATTRIBUTE_KEYS = ("values", "fluency", "factuality", "safety", "diversity", "creativity", "helpfulness")
USECASE_KEYS = (
    "homework_assistance", "research", "source_suggestions", "professional_work", "creative_writing",
    "casual_conversation", "personal_recommendations", "daily_productivity", "technical_or_programming_help",
    "travel_guidance", "lifestyle_and_hobbies", "well-being_guidance", "medical_guidance", "financial_guidance",
    "games", "historical_or_news_insight", "relationship_advice", "language_learning", "other",
)  # fmt: skip
PREF_KEYS = ("values", "creativity", "fluency", "factuality", "diversity", "safety", "personalisation", "helpfulness",
             "other")  # fmt: skip

# Categorical survey fields: (values, weights). The FIRST value is the group `plant_attribute` marks.
DEMOGRAPHICS: dict[str, tuple[tuple[str, ...], tuple[float, ...]]] = {
    "age": (("25-34 years old", "18-24 years old", "35-44 years old", "45-54 years old", "55-64 years old",
             "65+ years old", "Prefer not to say"), (30, 27, 18, 11, 8, 5, 1)),
    "gender": (("Female", "Male", "Non-binary / third gender", "Prefer not to say"), (48, 49.5, 2, 0.5)),
    "employment_status": (("Working full-time", "Working part-time", "Student", "Unemployed, seeking work",
                           "Unemployed, not seeking work", "Retired", "Homemaker / stay-at-home parent",
                           "Prefer not to say"), (42, 15, 17, 9, 3, 6, 6, 2)),
    "education": (("University Bachelors Degree", "Graduate / Professional degree", "Some University but no degree",
                   "Completed Secondary School", "Vocational", "Some Secondary", "Completed Primary School",
                   "Prefer not to say"), (38, 21, 16, 14, 7, 2, 1, 1)),
    "marital_status": (("Never been married", "Married", "Divorced / Separated", "Widowed", "Prefer not to say"),
                       (50, 38, 8, 2, 2)),
    "english_proficiency": (("Native speaker", "Fluent", "Advanced", "Intermediate", "Basic"), (62, 25, 9, 3, 1)),
    "lm_familiarity": (("Somewhat familiar", "Very familiar", "Not familiar at all"), (55, 40, 5)),
    "lm_indirect_use": (("Yes", "No", "Unsure"), (70, 15, 15)),
    "lm_direct_use": (("Yes", "No", "Unsure"), (85, 12, 3)),
}  # fmt: skip
FREQUENCIES = ("Every day", "Every week", "More than once a month", "Once per month", "Less than one a year")
RELIGIONS = (("Christian", 40), ("No Affiliation", 42), ("Muslim", 5), ("Jewish", 3), ("Hindu", 2),
             ("Buddhist", 2), ("Other", 3), ("Prefer not to say", 3))  # fmt: skip
ETHNICITIES = (("White", 62), ("Black / African", 10), ("Asian", 9), ("Hispanic / Latino", 8), ("Mixed", 6),
               ("Other", 3), ("Prefer not to say", 2))  # fmt: skip
# country, ISO3, region, subregion, special_region, study_locale, weight
COUNTRIES = (
    ("United States", "USA", "Americas", "Northern America", "US", "us", 22),
    ("United Kingdom", "GBR", "Europe", "Northern Europe", "UK", "uk", 22),
    ("Canada", "CAN", "Americas", "Northern America", "Northern America", "canada", 5),
    ("Australia", "AUS", "Oceania", "Australia and New Zealand", "Australia and New Zealand", "australia", 5),
    ("New Zealand", "NZL", "Oceania", "Australia and New Zealand", "Australia and New Zealand", "new-zealand", 2),
    ("Germany", "DEU", "Europe", "Western Europe", "Europe", "germany", 4),
    ("France", "FRA", "Europe", "Western Europe", "Europe", "france", 3),
    ("Italy", "ITA", "Europe", "Southern Europe", "Europe", "italy", 3),
    ("Spain", "ESP", "Europe", "Southern Europe", "Europe", "spain", 3),
    ("Poland", "POL", "Europe", "Eastern Europe", "Europe", "poland", 4),
    ("Portugal", "PRT", "Europe", "Southern Europe", "Europe", "portugal", 3),
    ("Netherlands", "NLD", "Europe", "Western Europe", "Europe", "netherlands", 2),
    ("Mexico", "MEX", "Americas", "Latin America and the Caribbean", "Latin America", "mexico", 4),
    ("Chile", "CHL", "Americas", "Latin America and the Caribbean", "Latin America", "chile", 3),
    ("South Africa", "ZAF", "Africa", "Sub-Saharan Africa", "Africa", "south-africa", 4),
    ("Nigeria", "NGA", "Africa", "Sub-Saharan Africa", "Africa", "nigeria", 2),
    ("Israel", "ISR", "Asia", "Western Asia", "Middle East", "israel", 3),
    ("India", "IND", "Asia", "Southern Asia", "Asia", "india", 3),
    ("Japan", "JPN", "Asia", "Eastern Asia", "Asia", "japan", 3),
)  # fmt: skip
CONSENT = "Yes, I consent to take part"
CONSENT_AGE = "Yes, I am 18 years or over"
FIRST_DAY = datetime(2023, 11, 22)
STUDY_DAYS = 30


# Sizes: a conversation costs about 80 KB of memory while the population is built (its texts, their embeddings and
# rows; 20,000 conversations took 1.6 GiB), so 200,000 (25 times PRISM's 8,011) need about 16 GiB.
MAX_CONVERSATIONS = 200_000  # expected over all users
MAX_USERS = MAX_CONVERSATIONS
MAX_CONVERSATIONS_PER_USER = 1_000


class BenchmarkConfigError(SettingError):
    """A benchmark knob outside its valid range; knobs are named with `setting` (fields by default, `synth` spells
    them as its flags)."""

    spelling = staticmethod(as_field)


@dataclass(frozen=True)
class BenchmarkConfig:
    """Knobs of the benchmark. Calibrated defaults: see simulations/calibrate_benchmark.py."""

    users: int = 1000
    rank: int = 4  # K, the true number of basis rewards
    noise: float = 0.35  # std of the slider noise, in units of the basis rewards' within-turn std
    heterogeneity: float = 0.3  # Dirichlet alpha: small = users close to single bases, large = everyone alike
    conversations: tuple[float, ...] = PRISM_CONVERSATIONS  # P(n conversations) for n = 0, 1, ...
    max_turns: int = 10
    seed: int = 0
    plant_attribute: str | None = None  # a DEMOGRAPHICS field; its first value's group leans toward 2 bases
    # Added to the planted group's Dirichlet alpha on PLANTED_BASES; 0.5 -> the group is predictable from the true w
    # with AUC ~0.79 (5-fold logistic on log w, 600 users, K=4, alpha 0.3), like the note's §10 audit.
    plant_strength: float = 0.5
    model: str | None = None  # embedder model (None = offline all-MiniLM-L6-v2)
    principal_directions: int = 32  # the basis mixes this many top principal directions
    identical_ab_rate: float = 0.01
    empty_response_rate: float = 0.005

    def __post_init__(self) -> None:
        if isinstance(self.conversations, list):
            object.__setattr__(self, "conversations", tuple(self.conversations))
        checks = [
            (self.users >= 1, f"{setting('users')} must be >= 1, got {self.users}"),
            (self.users <= MAX_USERS, f"{setting('users')} {self.users} is above {MAX_USERS:,} (PRISM has 1,500)"),
            (self.rank >= 1, f"{setting('rank')} must be >= 1, got {self.rank}"),
            (self.noise > 0 and np.isfinite(self.noise),
             f"{setting('noise')} must be finite and > 0, got {self.noise}"),
            (self.heterogeneity > 0 and np.isfinite(self.heterogeneity),  # inf: NaN weights, exit 0 (a tester)
             f"{setting('heterogeneity')} (Dirichlet alpha) must be finite and > 0, got {self.heterogeneity}"),
            (0 <= self.seed < 2**63, f"{setting('seed')} must be in [0, 2**63), got {self.seed}"),  # numpy's range
            (self.max_turns >= 1, f"{setting('max_turns')} must be >= 1, got {self.max_turns}"),
            (self.principal_directions >= self.rank,
             f"{setting('rank')} must be <= {self.principal_directions} (the principal directions the truth mixes), "
             f"got {self.rank}"),
            (0 <= self.identical_ab_rate <= 1, f"identical_ab_rate must be in [0, 1], got {self.identical_ab_rate}"),
            (0 <= self.empty_response_rate < 1,
             f"empty_response_rate must be in [0, 1), got {self.empty_response_rate}"),
            (self.plant_strength >= 0 and np.isfinite(self.plant_strength),
             f"{setting('plant_strength')} must be finite and >= 0, got {self.plant_strength}"),
        ]  # fmt: skip
        probs = np.asarray(self.conversations, dtype=float)
        valid = probs.ndim == 1 and probs.size >= 2 and (probs >= 0).all() and probs[1:].sum() > 0
        checks.append(
            (valid, f"{setting('conversations')} must be probabilities of 0, 1, ... conversations with some mass "
                    f"above 0, got {self.conversations}")
        )  # fmt: skip
        if valid and self.users >= 1:
            checks.append(self._size_check(probs))
        if self.plant_attribute is not None:
            checks.append(
                (self.plant_attribute in DEMOGRAPHICS,
                 f"{setting('plant_attribute')} must be one of {sorted(DEMOGRAPHICS)}, got {self.plant_attribute!r}")
            )  # fmt: skip
            checks.append(
                (self.rank >= 3, f"{setting('plant_attribute')} needs {setting('rank')} >= 3 (2 planted bases + "
                                 f"others), got {self.rank}")
            )
        for ok, message in checks:
            if not ok:
                raise BenchmarkConfigError(message)

    def _size_check(self, probs: np.ndarray) -> tuple[bool, str]:
        """Refused before anything is drawn: the population is built in memory (about 80 KB per conversation)."""
        expected = self.users * float(probs @ np.arange(probs.size)) / float(probs.sum())
        return (expected <= MAX_CONVERSATIONS,
                f"{setting('users')} {self.users} with {setting('conversations')} of mean "
                f"{expected / self.users:.3g} per user make about {expected:,.0f} conversations, above "
                f"{MAX_CONVERSATIONS:,} (about 16 GiB while they are built; PRISM has 8,011): lower either")


# The `lore-fed demo` population: ~5,800 texts to embed, synth in ~2-3 minutes on 2 CPU cores from an empty
# embedding cache (192 s measured under load); `prepare` keeps ~220 users (>= 6 conversations), median 12 train pairs.
DEMO_CONFIG = BenchmarkConfig(users=300, max_turns=3)


def conversation_distribution(spec: str) -> tuple[float, ...]:
    """Parse a conversations-per-user spec: "prism" (PRISM's distribution), "N" (everyone N) or "LO-HI" (uniform)."""
    text = spec.strip().lower()
    if text == "prism":
        return PRISM_CONVERSATIONS
    try:
        low, high = (int(part) for part in text.split("-")) if "-" in text else (int(text), int(text))
    except ValueError:
        raise BenchmarkConfigError(f"{setting('conversations')} must be 'prism', N or LO-HI (e.g. 6 or 4-7), got "
                                   f"{spec!r}") from None
    if not 0 <= low <= high or high < 1:
        raise BenchmarkConfigError(f"{setting('conversations')} range must satisfy 0 <= LO <= HI and HI >= 1, got "
                                   f"{spec!r}")
    if high > MAX_CONVERSATIONS_PER_USER:
        raise BenchmarkConfigError(f"{setting('conversations')} {spec!r} is above {MAX_CONVERSATIONS_PER_USER:,} "
                                   "conversations per user ('prism' gives at most 7)")
    probs = np.zeros(high + 1)
    probs[low : high + 1] = 1.0 / (high - low + 1)
    return tuple(float(p) for p in probs)


@dataclass(frozen=True)
class GroundTruth:
    """The hidden reward: basis (K, D), center (D,), per-user weights (U, K) and slider parameters (U,)."""

    basis: np.ndarray
    center: np.ndarray
    user_id: np.ndarray
    user_weights: np.ndarray
    logit_scale: float
    embedder: str
    slider_bias: np.ndarray
    slider_scale: np.ndarray
    planted_group: np.ndarray  # (U,) bool: in the planted group (all False without plant_attribute)
    config: BenchmarkConfig

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        knobs = {f"config_{k}": np.asarray("" if v is None else v) for k, v in asdict(self.config).items()}
        atomic_save_npz(
            path,
            basis=self.basis.astype(np.float32),
            center=self.center.astype(np.float32),
            user_id=self.user_id.astype(str),
            user_weights=self.user_weights,
            logit_scale=np.asarray(self.logit_scale, dtype=np.float64),
            embedder=np.asarray(self.embedder),
            slider_bias=self.slider_bias,
            slider_scale=self.slider_scale,
            planted_group=self.planted_group,
            planted_bases=np.asarray(PLANTED_BASES if self.config.plant_attribute else (), dtype=np.int64),
            **knobs,
        )
        return path


def load_ground_truth(path: str | Path) -> GroundTruth:
    """Read `ground_truth.npz` (or `DIR/ground_truth.npz`) written by `GroundTruth.save`."""
    path = Path(path)
    if path.is_dir():
        path = path / GROUND_TRUTH_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ground-truth file (only `lore-fed synth` populations have one)")
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    knobs = {}
    for f in fields(BenchmarkConfig):
        value = arrays[f"config_{f.name}"]
        value = value.item() if value.ndim == 0 else tuple(value.tolist())
        knobs[f.name] = None if value == "" and f.name in ("plant_attribute", "model") else value
    return GroundTruth(
        basis=arrays["basis"],
        center=arrays["center"],
        user_id=arrays["user_id"],
        user_weights=arrays["user_weights"],
        logit_scale=float(arrays["logit_scale"]),
        embedder=str(arrays["embedder"]),
        slider_bias=arrays["slider_bias"],
        slider_scale=arrays["slider_scale"],
        planted_group=arrays["planted_group"],
        config=BenchmarkConfig(**knobs),
    )


@dataclass
class Benchmark:
    """A generated population. `response_embeddings` (M, D) and `true_rewards` (M,) are aligned with `utterances`
    (one row per model response) and stay in memory: checks and calibration use them, the files never hold them."""

    survey: list[dict]
    conversations: list[dict]
    utterances: list[dict]
    truth: GroundTruth
    response_embeddings: np.ndarray
    true_rewards: np.ndarray
    stats: dict = field(default_factory=dict)

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write the truth, then survey/conversations/utterances JSONL (json.dumps, ASCII-escaped, as the release).
        The truth first: a directory with release files is a population of `synth` only where it has one (`synth`
        refuses any other --out holding them), so a write cut short must leave it there for the rerun."""
        out_dir = Path(out_dir)
        written = {GROUND_TRUTH_FILE: self.truth.save(out_dir / GROUND_TRUTH_FILE)}
        paths = {
            SURVEY_FILE: (out_dir / SURVEY_FILE, self.survey),
            CONVERSATIONS_FILE: (out_dir / CONVERSATIONS_FILE, self.conversations),
            UTTERANCES_FILE: (out_dir / UTTERANCES_FILE, self.utterances),
        }
        for path, rows in paths.values():
            atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
        written.update({name: path for name, (path, _) in paths.items()})
        return written


def generate_benchmark(config: BenchmarkConfig, embedder, *, pool: TextPool | None = None) -> Benchmark:
    """Generate a population. `embedder`: lore_core.embeddings embedder (`.name`, `.dim`, `.embed(contexts,
    responses)`); contexts are passed as message lists, exactly what `prepare` hands to `embed`."""
    pool = pool if pool is not None else build_text_pool(config.seed)
    streams = [np.random.default_rng([config.seed, k]) for k in range(6)]
    people_rng, structure_rng, truth_rng, slider_rng, noise_rng, tie_rng = streams

    survey, counts = _survey_rows(config, pool, people_rng)
    planted = _planted_group(config, survey)
    weights = _user_weights(config, planted, truth_rng)
    bias = slider_rng.uniform(*SLIDER_BIAS, size=config.users)
    scale = slider_rng.uniform(*SLIDER_SCALE, size=config.users)
    plan = _plan_conversations(config, pool, counts, structure_rng)

    n = plan["conv"].size
    if n == 0:
        raise BenchmarkConfigError(f"{config.users} users drew no conversations; raise {setting('users')} or "
                                   f"{setting('conversations')}")
    phi = np.zeros((n, embedder.dim), dtype=np.float32)
    reward = np.zeros(n)
    score = np.zeros(n, dtype=np.int64)
    chosen = np.zeros(n, dtype=bool)
    histories: list[list[dict]] = [[] for _ in plan["prompts"]]
    conv_model = np.full(len(histories), -1, dtype=np.int64)
    for t in range(int(plan["turn"].max()) + 1):
        rows = np.flatnonzero(plan["turn"] == t)
        convs = np.unique(plan["conv"][rows])
        for c in convs:
            histories[c].append({"role": "user", "content": plan["prompts"][c][t]})
        contexts = [list(histories[c]) for c in plan["conv"][rows]]
        phi[rows] = embedder.embed(contexts, [plan["text"][r] for r in rows])
        if t == 0:
            opener = np.unique([plan["prompts"][c][0] for c in plan["conv"][rows]], return_inverse=True)[1]
            basis, center = _truth_basis(phi[rows], opener.reshape(-1), config, truth_rng)
        user = plan["user"][rows]
        reward[rows] = np.einsum("nk,nk->n", (phi[rows] - center) @ basis.T, weights[user])
        noisy = reward[rows] + noise_rng.normal(0.0, config.noise, rows.size)
        score[rows] = np.clip(np.rint(bias[user] + scale[user] * noisy), SCORE_MIN, SCORE_MAX)
        # An identical A/B pair is one text: the user gives it one score (the B row copies A's).
        twin = plan["identical"][rows]
        score[rows[twin]] = score[rows[twin] - 1]
        # argmax score per conversation, ties broken at random.
        order = np.lexsort((-tie_rng.random(rows.size), -score[rows], plan["conv"][rows]))
        _, first = np.unique(plan["conv"][rows][order], return_index=True)
        best = rows[order[first]]  # one per conversation, in `convs` order
        best_text = np.asarray([plan["text"][r] for r in best], dtype=object)
        chosen[rows] = best_text[np.searchsorted(convs, plan["conv"][rows])] == np.asarray(
            [plan["text"][r] for r in rows], dtype=object
        )
        if t == 0:  # exactly one chosen at turn 0, even when texts repeat; it answers all later turns
            chosen[rows] = False
            chosen[best] = True
            conv_model[convs] = plan["model"][best]
            later = plan["turn"] > 0
            plan["model"][later] = conv_model[plan["conv"][later]]
        for c, text in zip(convs, best_text):
            histories[c].append({"role": "assistant", "content": text})

    truth = GroundTruth(
        basis=basis,
        center=center,
        user_id=np.asarray([row["user_id"] for row in survey]),
        user_weights=weights,
        logit_scale=PROBIT_TO_LOGIT / (np.sqrt(2.0) * config.noise),
        embedder=embedder.name,
        slider_bias=bias,
        slider_scale=scale,
        planted_group=planted,
        config=config,
    )
    conversations = _conversation_rows(plan, survey, score, chosen, pool, structure_rng)
    utterances = derive_utterances(_as_release_conversations(conversations))
    stats = {
        "users": config.users,
        "survey_only_users": int((counts == 0).sum()),
        "conversations": len(conversations),
        "utterances": len(utterances),
        "interactions": len({u["interaction_id"] for u in utterances}),
        "turn0_top_ties": int(_turn0_top_ties(plan, score)),
        "identical_ab": int(plan["identical"].sum()),
        "empty_responses": int(sum(text == EMPTY_RESPONSE for text in plan["text"])),
        "planted_group_users": int(planted.sum()),
    }
    return Benchmark(survey, conversations, utterances, truth, phi, reward, stats)


# --- truth -----------------------------------------------------------------------------------------------------------
def _truth_basis(phi: np.ndarray, group: np.ndarray, config: BenchmarkConfig, rng) -> tuple[np.ndarray, np.ndarray]:
    """Basis (K, D) and center (D,) from turn-0 embeddings phi (n, D) grouped by context (n,) ints.

    Deviations from each turn's mean response are what pair differences see; their top principal directions are
    mixed by a random orthonormal matrix and each basis row is scaled to unit reward std over the deviations."""
    phi = phi.astype(np.float64)
    unique_rows = np.unique(np.column_stack([group, phi]), axis=0)  # the same (context, response) counts once
    group_u, phi_u = unique_rows[:, 0].astype(np.int64), unique_rows[:, 1:]
    ids, inverse = np.unique(group_u, return_inverse=True)
    counts = np.bincount(inverse)
    means = np.zeros((ids.size, phi.shape[1]))
    np.add.at(means, inverse, phi_u)
    deviations = (phi_u - means[inverse] / counts[inverse, None])[counts[inverse] > 1]
    _, singular, vt = np.linalg.svd(deviations, full_matrices=False)
    n_dir = int(min(config.principal_directions, (singular > 1e-8 * singular[0]).sum()))
    if n_dir < config.rank:
        raise BenchmarkConfigError(
            f"only {n_dir} principal directions in the turn-0 embeddings, fewer than {setting('rank')} {config.rank}; "
            f"generate more {setting('users')} or {setting('conversations')}, or lower {setting('rank')}"
        )
    mix, _ = np.linalg.qr(rng.standard_normal((n_dir, config.rank)))  # (n_dir, K), orthonormal columns
    directions = mix.T @ vt[:n_dir]  # (K, D), orthonormal rows
    basis = directions / (deviations @ directions.T).std(axis=0)[:, None]
    return basis.astype(np.float32), phi_u.mean(axis=0).astype(np.float32)


def _planted_group(config: BenchmarkConfig, survey: list[dict]) -> np.ndarray:
    if config.plant_attribute is None:
        return np.zeros(len(survey), dtype=bool)
    value = DEMOGRAPHICS[config.plant_attribute][0][0]
    return np.asarray([row[config.plant_attribute] == value for row in survey], dtype=bool)


def _user_weights(config: BenchmarkConfig, planted: np.ndarray, rng) -> np.ndarray:
    """w_u ~ Dirichlet(alpha_u) (U, K), drawn as normalised Gamma variables (one vectorised call)."""
    alpha = np.full((config.users, config.rank), config.heterogeneity)
    alpha[np.ix_(planted, PLANTED_BASES)] += config.plant_strength  # `planted` is all False without an attribute
    gamma = np.maximum(rng.gamma(alpha), 1e-300)
    return gamma / gamma.sum(axis=1, keepdims=True)


# --- structure -------------------------------------------------------------------------------------------------------
def _plan_conversations(config: BenchmarkConfig, pool: TextPool, counts: np.ndarray, rng) -> dict:
    """All text decisions that do not depend on the users' choices, flattened to one row per model response in
    utterance order (conversation, turn, within_turn_id)."""
    n_conv = int(counts.sum())
    conv_user = np.repeat(np.arange(config.users), counts)
    n_turns = np.minimum(rng.geometric(TURN_STOP_PROB, n_conv) + 1, config.max_turns)
    opener = rng.integers(len(pool.openers), size=n_conv)
    sizes = np.array(list(TURN0_COUNT_PROBS))
    n_first = rng.choice(sizes, size=n_conv, p=np.array(list(TURN0_COUNT_PROBS.values())))
    conv, turn, within, text, model, prompts = [], [], [], [], [], []
    for c in range(n_conv):
        exchange = pool.openers[opener[c]]
        follow = pool.follow_ups[exchange.category]
        later = rng.permutation(len(follow))
        turn_prompts = [exchange.prompt]
        m = n_first[c]
        picks = rng.permutation(CANDIDATES_PER_EXCHANGE)[:m]
        conv += [c] * m
        turn += [0] * m
        within += list(range(m))
        text += [exchange.candidates[i] for i in picks]
        model += list(rng.choice(len(MODELS), size=m, replace=False))
        for t in range(1, n_turns[c]):
            follow_up = follow[later[(t - 1) % len(follow)]]
            turn_prompts.append(follow_up.prompt)
            a, b = rng.permutation(CANDIDATES_PER_EXCHANGE)[:2]
            same = rng.random() < config.identical_ab_rate
            conv += [c, c]
            turn += [t, t]
            within += [0, 1]
            text += [follow_up.candidates[a], follow_up.candidates[a if same else b]]
            model += [-1, -1]  # filled with the turn-0 chosen model
        prompts.append(turn_prompts)
    empty = rng.random(len(text)) < config.empty_response_rate
    text = [EMPTY_RESPONSE if e else t for t, e in zip(text, empty)]
    # Any A/B with one text (planned, or two EMPTY STRINGs) is identical: both chosen, one score.
    within = np.asarray(within, dtype=np.int64)
    identical = np.zeros(len(text), dtype=bool)
    b_rows = np.flatnonzero((np.asarray(turn) > 0) & (within == 1))
    identical[b_rows] = [text[i] == text[i - 1] for i in b_rows]
    return {
        "conv": np.asarray(conv, dtype=np.int64),
        "turn": np.asarray(turn, dtype=np.int64),
        "within": within,
        "text": text,
        "model": np.asarray(model, dtype=np.int64),
        "identical": identical,
        "user": conv_user[np.asarray(conv, dtype=np.int64)],
        "prompts": prompts,
        "conv_user": conv_user,
    }


def _turn0_top_ties(plan: dict, score: np.ndarray) -> int:
    rows = np.flatnonzero(plan["turn"] == 0)
    if not rows.size:
        return 0
    top = np.zeros(plan["conv"].max() + 1, dtype=np.int64)
    np.maximum.at(top, plan["conv"][rows], score[rows])
    at_top = np.bincount(plan["conv"][rows], weights=score[rows] == top[plan["conv"][rows]])
    return int((at_top > 1).sum())


# --- records ---------------------------------------------------------------------------------------------------------
def _weighted(rng, values, weights, size):
    p = np.asarray(weights, dtype=float)
    return rng.choice(len(values), size=size, p=p / p.sum())


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _survey_rows(config: BenchmarkConfig, pool: TextPool, rng) -> tuple[list[dict], np.ndarray]:
    """Survey rows in the release's key order, and the number of conversations per user (U,).

    Demographics are drawn independently of everything else; only `plant_attribute` links one to the weights."""
    users = config.users
    probs = np.asarray(config.conversations, dtype=float)
    counts = rng.choice(probs.size, size=users, p=probs / probs.sum())
    draws = {key: _weighted(rng, values, weights, users) for key, (values, weights) in DEMOGRAPHICS.items()}
    reside = _weighted(rng, COUNTRIES, [c[-1] for c in COUNTRIES], users)
    born_here = rng.random(users) < 0.85
    birth = np.where(born_here, reside, _weighted(rng, COUNTRIES, [c[-1] for c in COUNTRIES], users))
    religion = _weighted(rng, RELIGIONS, [w for _, w in RELIGIONS], users)
    ethnicity = _weighted(rng, ETHNICITIES, [w for _, w in ETHNICITIES], users)
    frequency = rng.integers(len(FREQUENCIES), size=users)
    duration = np.exp(rng.normal(np.log(1500.0), 0.6, users)) + 160.0
    started = rng.uniform(0, STUDY_DAYS * 86400, users)
    studies = [rng.bytes(12).hex() for _ in range(20)]  # opaque ids like the release's
    study = rng.integers(len(studies), size=users)
    usecase = rng.random((users, len(USECASE_KEYS))) < 0.35
    # Ranks 1..k over the k use cases a user ticked ("other" is always ranked 19, as in the release).
    ticked = usecase[:, :-1]
    usecase_rank = np.argsort(np.argsort(np.where(ticked, rng.random(ticked.shape), np.inf), axis=1), axis=1) + 1
    prefs = rng.integers(0, 101, size=(users, len(PREF_KEYS) - 1))
    pref_rank = np.argsort(np.argsort(rng.random((users, len(PREF_KEYS) - 1)), axis=1), axis=1) + 1
    balanced = rng.random(users) < 0.45
    remark = rng.integers(len(pool.remarks), size=(users, 2))
    rows = []
    for u in range(users):
        only = bool(counts[u] == 0)
        home, born = COUNTRIES[reside[u]], COUNTRIES[birth[u]]
        lm = {k: None if only else int(usecase[u, i]) for i, k in enumerate(USECASE_KEYS)}
        order_lm = {k: (None if only or not usecase[u, i] else (19 if k == "other" else int(usecase_rank[u, i])))
                    for i, k in enumerate(USECASE_KEYS)}  # fmt: skip
        row = {
            "user_id": f"user{u}",
            "survey_only": only,
            "num_completed_conversations": int(counts[u]),
            "timing_duration_s": round(float(duration[u]), 2),
            "timing_duration_mins": round(float(duration[u]) / 60.0, 2),
            "generated_datetime": _stamp(FIRST_DAY + timedelta(seconds=float(started[u]))),
            "consent": CONSENT,
            "consent_age": CONSENT_AGE,
            "lm_familiarity": DEMOGRAPHICS["lm_familiarity"][0][draws["lm_familiarity"][u]],
            "lm_indirect_use": DEMOGRAPHICS["lm_indirect_use"][0][draws["lm_indirect_use"][u]],
            "lm_direct_use": DEMOGRAPHICS["lm_direct_use"][0][draws["lm_direct_use"][u]],
            "lm_frequency_use": None if only else FREQUENCIES[frequency[u]],
            "self_description": pool.remarks[remark[u, 0]],
            "system_string": pool.remarks[remark[u, 1]],
            **{k: DEMOGRAPHICS[k][0][draws[k][u]] for k in
               ("age", "gender", "employment_status", "education", "marital_status", "english_proficiency")},
            "study_id": studies[study[u]],
            "study_locale": home[5],
            "religion": _category(RELIGIONS[religion[u]][0]),
            "ethnicity": _category(ETHNICITIES[ethnicity[u]][0]),
            "location": {
                "birth_country": born[0], "birth_countryISO": born[1], "birth_region": born[2],
                "birth_subregion": born[3], "reside_country": home[0], "reside_region": home[2],
                "reside_subregion": home[3], "reside_countryISO": home[1],
                "same_birth_reside_country": "Yes" if born[0] == home[0] else "No", "special_region": home[4],
            },
            "lm_usecases": {**lm, "other_text": None},
            "stated_prefs": {**{k: int(prefs[u, i]) for i, k in enumerate(PREF_KEYS[:-1])}, "other": None,
                             "other_text": None},
            "order_lm_usecases": order_lm,
            "order_stated_prefs": {**{k: int(pref_rank[u, i]) for i, k in enumerate(PREF_KEYS[:-1])}, "other": None},
            "included_in_US_REP": home[5] == "us" and bool(balanced[u]),
            "included_in_UK_REP": home[5] == "uk" and bool(balanced[u]),
            "included_in_balanced_subset": bool(balanced[u]) and not only,
        }  # fmt: skip
        rows.append({key: row[key] for key in SURVEY_SCHEMA})
    return rows, counts


def _category(name: str) -> dict:
    return {"self_described": name, "categorised": name, "simplified": name}


def _conversation_rows(plan, survey, score, chosen, pool: TextPool, rng) -> list[dict]:
    n_conv = len(plan["prompts"])
    starts = np.searchsorted(plan["conv"], np.arange(n_conv + 1))
    kinds = _weighted(rng, CONVERSATION_TYPES, [w for _, w in CONVERSATION_TYPES], n_conv)
    duration = np.exp(rng.normal(np.log(420.0), 0.5, n_conv)) + 60.0
    attributes = rng.integers(1, 101, size=(n_conv, 2, len(ATTRIBUTE_KEYS)))
    missing = rng.random((n_conv, 2, len(ATTRIBUTE_KEYS))) < 0.04
    empty_attributes = rng.random((n_conv, 2)) < 0.005
    feedback = rng.integers(len(pool.remarks), size=n_conv)
    # A user's conversations follow one another from their survey time: offset = time spent in earlier ones.
    elapsed = np.cumsum(duration + 60.0) - (duration + 60.0)
    first = np.searchsorted(plan["conv_user"], plan["conv_user"])
    offset = elapsed - elapsed[first] + 60.0
    rows = []
    for c in range(n_conv):
        user = survey[plan["conv_user"][c]]
        history = []
        for t, prompt in enumerate(plan["prompts"][c]):
            history.append({"turn": t, "role": "user", "content": prompt})
            for r in range(starts[c], starts[c + 1]):
                if plan["turn"][r] != t:
                    continue
                name, provider = MODELS[plan["model"][r]]
                history.append({
                    "turn": t, "role": "model", "content": plan["text"][r], "model_provider": provider,
                    "model_name": name, "score": int(score[r]), "if_chosen": bool(chosen[r]),
                    "within_turn_id": int(plan["within"][r]),
                })  # fmt: skip
        attrs = [
            {} if empty_attributes[c, k] else
            {key: None if missing[c, k, i] else int(attributes[c, k, i]) for i, key in enumerate(ATTRIBUTE_KEYS)}
            for k in range(2)
        ]  # fmt: skip
        row = {
            "conversation_id": f"c{c}",
            "user_id": user["user_id"],
            "included_in_balanced_subset": user["included_in_balanced_subset"],
            "generated_datetime": _stamp(datetime.strptime(user["generated_datetime"], "%Y-%m-%d %H:%M:%S")
                                        + timedelta(seconds=float(offset[c]))),
            "timing_duration_s": round(float(duration[c]), 2),
            "timing_duration_mins": round(float(duration[c]) / 60.0, 2),
            "conversation_type": CONVERSATION_TYPES[kinds[c]][0],
            "opening_prompt": plan["prompts"][c][0],
            "conversation_turns": len(plan["prompts"][c]),
            "conversation_history": history,
            "performance_attributes": attrs[0],
            "choice_attributes": attrs[1],
            "open_feedback": pool.remarks[feedback[c]],
        }
        rows.append({key: row[key] for key in CONVERSATION_SCHEMA})
    return rows


def _as_release_conversations(rows: list[dict]) -> list[Conversation]:
    """The reader's view of our rows, so utterances come from the one `derive_utterances`."""
    out = []
    for line, row in enumerate(rows, start=1):
        turns: list[Turn] = []
        for message in row["conversation_history"]:
            if message["role"] == "user":
                turns.append(Turn(message["turn"], message["content"], ()))
                continue
            response = Response(
                text=message["content"], score=message["score"], chosen=message["if_chosen"],
                within_turn_id=message["within_turn_id"], model_name=message["model_name"],
                model_provider=message["model_provider"],
            )  # fmt: skip
            turns[-1] = replace(turns[-1], responses=turns[-1].responses + (response,))
        out.append(
            Conversation(row["conversation_id"], row["user_id"], row["conversation_type"],
                         row["included_in_balanced_subset"], tuple(turns), line)
        )  # fmt: skip
    return out
