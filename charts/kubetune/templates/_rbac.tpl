{{/* Rules on namespaced resources: the FineTuneJobs, their children, events (rbac.py). */}}
{{- define "kubetune.namespacedRules" -}}
# FineTuneJobs: watched by kopf; annotations and finalizer patched; deleted after their TTL.
- apiGroups: [kubetune.dev]
  resources: [finetunejobs]
  verbs: [get, list, watch, patch, delete]
# Status written by the reconciler.
- apiGroups: [kubetune.dev]
  resources: [finetunejobs/status]
  verbs: [get, patch]
# Children carry blockOwnerDeletion: clusters enforcing owner-reference permissions
# (OwnerReferencesPermissionEnforcement, on in OpenShift) require this to create them.
- apiGroups: [kubetune.dev]
  resources: [finetunejobs/finalizers]
  verbs: [update]
# Each attempt's Indexed Job: created, suspended/resumed, deleted between attempts.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch, delete]
# The job's config and headless Service: created once (owned by the FineTuneJob); one left
# by an earlier FineTuneJob of the same name is deleted and replaced.
- apiGroups: [""]
  resources: [configmaps, services]
  verbs: [get, create, delete]
{{- if .Values.trainer.networkPolicy.enabled }}
# Each job's NetworkPolicy: created once (owned by the FineTuneJob); one left by an earlier
# FineTuneJob of the same name is deleted and replaced. Not granted when the feature is off.
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, create, delete]
{{- end }}
- apiGroups: [scheduling.volcano.sh, scheduling.x-k8s.io]
  resources: [podgroups]
  verbs: [get, create]
# FineTuneRuntimes (curated per namespace): read once per job before its first attempt.
- apiGroups: [kubetune.dev]
  resources: [finetuneruntimes]
  verbs: [get]
# Trainer pods: read; pods of a finished attempt deleted, force-deleted when their node is
# gone (the next attempt waits for every one of them).
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, delete]
# Events for every transition; the Job controller's FailedCreate events listed (Pending).
- apiGroups: [""]
  resources: [events]
  verbs: [create, list]
{{- end }}

{{/* kopf discovers and watches CRDs (a CRD installed later is noticed); ClusterFineTuneRuntimes
(cluster-scoped) are read once per job before its first attempt. */}}
{{- define "kubetune.crdRules" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [get, list, watch]
- apiGroups: [kubetune.dev]
  resources: [clusterfinetuneruntimes]
  verbs: [get]
{{- end }}
