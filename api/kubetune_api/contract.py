"""The launch contract between the operator (pod side) and the trainer (process side).

Both sides import these names; docs/contract.md explains them. Changing a value here changes
both sides at once, which is the point.
"""

from __future__ import annotations

# The pod runs torchrun through a thin wrapper that only maps exit codes (plain torchrun exits 1
# for everything, SIGTERM included); arguments and PET_* variables are torchrun's own.
TRAINER_MODULE = "kubetune_trainer"
NODE_LAUNCHER_MODULE = "kubetune_trainer.node"
CONFIG_DIR = "/etc/kubetune"
CONFIG_FILE = "finetunejob.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"
POD_COMMAND = ("python", "-m", NODE_LAUNCHER_MODULE, "-m", TRAINER_MODULE, "--config", CONFIG_PATH)

# torchrun reads PET_<ARG> as its --<arg>; the operator sets exactly these.
PET_NNODES = "PET_NNODES"
PET_NPROC_PER_NODE = "PET_NPROC_PER_NODE"
PET_NODE_RANK = "PET_NODE_RANK"
PET_MASTER_ADDR = "PET_MASTER_ADDR"
PET_MASTER_PORT = "PET_MASTER_PORT"
DEFAULT_MASTER_PORT = 29500

# The FineTuneJob's UID, recorded in every checkpoint marker (docs/contract.md).
JOB_UID_ENV = "KUBETUNE_JOB_UID"
# torchrun's time between forwarding SIGTERM to its workers and SIGKILL; the operator sets it
# from the pod's terminationGracePeriodSeconds.
SHUTDOWN_TIMEOUT_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"


def worker_shutdown_timeout(grace_seconds: int) -> int:
    """The pod's grace period less a margin (10 %, at least 5 s) for torchrun and the node
    wrapper to exit before the kubelet's SIGKILL."""
    return max(1, grace_seconds - max(5, grace_seconds // 10))


# Exit codes of the trainer process (and so of the pod's container).
EXIT_OK = 0
EXIT_INVALID_SPEC = 2  # bad spec or data: permanent, restarting cannot help
EXIT_PREEMPTED = 75  # SIGTERM: a checkpoint was saved; retryable (EX_TEMPFAIL)
PERMANENT_EXIT_CODES = frozenset({EXIT_INVALID_SPEC})
RETRYABLE_EXIT_CODES = frozenset({EXIT_PREEMPTED})

# Rank 0 writes a JSON summary here when it succeeds; Kubernetes copies it into the
# container status (state.terminated.message), where the operator reads the output digest.
TERMINATION_LOG_ENV = "KUBETUNE_TERMINATION_LOG"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"

# Output layout: the manifest is written last and is the commit marker of an artifact.
MANIFEST_FILE = "kubetune-manifest.json"
CHECKPOINT_MARKER_FILE = "COMPLETE"
CHECKPOINTS_SUBDIR = "checkpoints"

# Metrics the operator scrapes from rank 0 (trainer exports more; see docs/metrics.md).
METRIC_STEP = "kubetune_trainer_step"
METRIC_TOTAL_STEPS = "kubetune_trainer_total_steps"
METRIC_LOSS = "kubetune_trainer_loss"
METRIC_TOKENS_PER_SECOND = "kubetune_trainer_tokens_per_second"
METRIC_ETA_SECONDS = "kubetune_trainer_eta_seconds"

# Paths the operator mounts in every trainer pod. The root filesystem is read-only, so these
# volumes are where the trainer may write; a FineTuneJob's own volumeMounts may not cover them.
SCRATCH_DIR = "/tmp"  # emptyDir: TMPDIR, Triton/torch-extension caches, local checkpoints
SHM_DIR = "/dev/shm"  # in-memory emptyDir for NCCL and data-loader workers
HF_HOME_DIR = "/var/cache/kubetune/huggingface"  # emptyDir: HF_HOME (datasets cache, xet, ...)
HF_HUB_CACHE_DIR = f"{HF_HOME_DIR}/hub"  # HF_HUB_CACHE: spec.model.cache's claim, if any
SECRETS_DIR = "/var/run/secrets/kubetune"  # read-only Secret files (the Hub token)
HF_TOKEN_DIR = f"{SECRETS_DIR}/hf-token"
# output.pushToHub.tokenSecret's key, when the push has a token of its own; the trainer reads
# the file named by HUB_PUSH_TOKEN_PATH_ENV (else the Hub client's own HF_TOKEN_PATH).
HUB_PUSH_TOKEN_DIR = f"{SECRETS_DIR}/hub-push-token"
HUB_PUSH_TOKEN_PATH_ENV = "KUBETUNE_HUB_PUSH_TOKEN_PATH"
IMAGE_OUTPUT_DIR = "/opt/kubetune/out"  # emptyDir: relative output URIs of the examples
IMAGE_HOME_DIR = "/home/kubetune"  # the trainer images' HOME (in the image: ~/.local stays)
HOME_CACHE_DIR = f"{IMAGE_HOME_DIR}/.cache"  # emptyDir: what libraries write under HOME
RESERVED_MOUNT_PATHS = (CONFIG_DIR, SCRATCH_DIR, SHM_DIR, HF_HOME_DIR, SECRETS_DIR,
                        IMAGE_OUTPUT_DIR, HOME_CACHE_DIR, DEFAULT_TERMINATION_LOG)

# What the operator puts on every trainer pod and clients (the SDK, `kubetune logs`) select by:
# the FineTuneJob's UID as a label (a name may be reused; a UID never), and the container name.
POD_LABEL_JOB_UID = "kubetune.dev/finetunejob-uid"
TRAINER_CONTAINER = "trainer"
POD_LABEL_ATTEMPT = "kubetune.dev/attempt"  # the gang attempt (status.attempt) of a Job/pod

# The storage Secret (spec.storage.secretName or the operator's default) reaches the trainer as
# read-only files here, never as environment variables; the trainer turns AWS keys into a
# shared credentials file and points GOOGLE_APPLICATION_CREDENTIALS at a key file
# (kubetune_trainer/credentials.py, docs/storage.md).
STORAGE_SECRET_DIR = f"{SECRETS_DIR}/storage"
STORAGE_CREDENTIALS_DIR_ENV = "KUBETUNE_STORAGE_CREDENTIALS_DIR"

# spec.output.oci.secretName (a kubernetes.io/dockerconfigjson Secret) reaches the trainer as
# read-only files here; the trainer reads `.dockerconfigjson` (or `config.json`) for the
# registry's credentials (kubetune_trainer/oci.py, docs/storage.md#oci-registries).
OCI_SECRET_DIR = f"{SECRETS_DIR}/oci"
OCI_CREDENTIALS_DIR_ENV = "KUBETUNE_OCI_CREDENTIALS_DIR"
