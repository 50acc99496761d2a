{{/*
The Prefect work pool's base job template (prefect-kubernetes), as YAML; the ConfigMap
converts it to JSON. Prefect's own placeholders ("{{ name }}") are written as Helm string
literals so that Helm leaves them alone.

The container's env is a literal list: prefect-kubernetes prepends the flow run's env
(PREFECT_API_URL, the flow run id, ... and the `env` job variable) to such a list, so the
secretKeyRef entries survive. A Prefect Cloud API key the worker holds is swapped for a
secretKeyRef by the worker (PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_KEY_SECRET_NAME).
*/}}
{{- define "noisescore.jobTemplate" -}}
{{- $job := .Values.worker.job }}
{{- $gpus := int $job.gpus }}
{{- $torchrun := include "noisescore.job.torchrun" . }}
{{- $perPod := int $job.gpusPerJob }}
{{- $nodes := int $job.nodes }}
{{- $podGpus := include "noisescore.job.podGpus" . | int }}
{{- $rendezvous := include "noisescore.job.rendezvousService" . }}
job_configuration:
  command: '{{ "{{ command }}" }}'
  env: '{{ "{{ env }}" }}'
  labels: '{{ "{{ labels }}" }}'
  name: '{{ "{{ name }}" }}'
  namespace: '{{ "{{ namespace }}" }}'
  job_manifest:
    apiVersion: batch/v1
    kind: Job
    metadata:
      generateName: '{{ "{{ name }}" }}-'
      labels: '{{ "{{ labels }}" }}'
      namespace: '{{ "{{ namespace }}" }}'
    spec:
      # A failed pod is not retried by Kubernetes: Prefect owns retries (a rerun with the
      # same job id resumes from the stored warm-up checkpoint).
      backoffLimit: 0
      {{- if gt $nodes 1 }}
      # One pod per node slot, pod i with hostname <job>-<i> under the rendezvous Service;
      # any pod failing fails the Job (backoffLimit 0), and Kubernetes stops the others.
      completionMode: Indexed
      completions: {{ $nodes }}
      parallelism: {{ $nodes }}
      {{- end }}
      ttlSecondsAfterFinished: '{{ "{{ finished_job_ttl }}" }}'
      {{- with $job.activeDeadlineSeconds }}
      activeDeadlineSeconds: {{ . | int64 }}
      {{- end }}
      template:
        metadata:
          labels:
            {{- include "noisescore.selectorLabels" (list . "cleaning-job") | nindent 12 }}
          {{- with $job.podAnnotations }}
          annotations:
            {{- toYaml . | nindent 12 }}
          {{- end }}
        spec:
          # prefect-kubernetes refuses a job manifest without these two pod-spec keys (its
          # validation compares against its own base manifest); the API server ignores them.
          parallelism: 1
          completions: 1
          restartPolicy: Never
          {{- if gt $nodes 1 }}
          subdomain: {{ $rendezvous }}
          {{- end }}
          serviceAccountName: '{{ "{{ service_account_name }}" }}'
          automountServiceAccountToken: false
          {{- include "noisescore.imagePullSecrets" . | nindent 10 }}
          nodeSelector: '{{ "{{ node_selector }}" }}'
          tolerations: '{{ "{{ tolerations }}" }}'
          affinity: '{{ "{{ affinity }}" }}'
          {{- with .Values.podSecurityContext }}
          securityContext:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          containers:
            - name: prefect-job
              image: '{{ "{{ image }}" }}'
              imagePullPolicy: '{{ "{{ image_pull_policy }}" }}'
              {{- if $torchrun }}
              # One process per GPU (noisescore flow execute: rank 0 runs the flow run,
              # the other ranks serve its training stages); a rank that dies fails the pod.
              args:
                - torchrun
                - --nnodes={{ $nodes }}
                - --nproc-per-node={{ $perPod }}
                - --max-restarts=0
                {{- if eq $nodes 1 }}
                - --standalone
                {{- else }}
                - --rdzv-backend=c10d
                - --rdzv-endpoint=$(JOB_NAME)-0.{{ $rendezvous }}.{{ .Release.Namespace }}.svc.{{ $job.clusterDomain }}:29400
                - --rdzv-id=$(JOB_NAME)
                {{- end }}
                - -m
                - noisescore.cli
                - flow
                - execute
              {{- else }}
              args: '{{ "{{ command }}" }}'
              {{- end }}
              envFrom:
                - configMapRef:
                    name: {{ include "noisescore.suffixed" (list . "storage") }}
              env:
                {{- include "noisescore.storage.credentialsEnv" . | nindent 16 }}
                - name: HOME
                  value: /tmp
                - name: PREFECT_HOME
                  value: /tmp/prefect
                - name: MPLCONFIGDIR
                  value: /tmp/matplotlib
                - name: PYTHONDONTWRITEBYTECODE
                  value: "1"
                {{- with .Values.metrics.pushgateway.url }}
                - name: NOISESCORE_PUSHGATEWAY
                  value: {{ . | quote }}
                {{- end }}
                {{- if $job.dataVolume.claimName }}
                - name: NOISESCORE_DATA_DIR
                  value: /data
                {{- end }}
                {{- if gt $nodes 1 }}
                - name: JOB_NAME
                  valueFrom:
                    fieldRef:
                      fieldPath: metadata.labels['batch.kubernetes.io/job-name']
                {{- end }}
              resources:
                requests:
                  cpu: '{{ "{{ cpu_request }}" }}'
                  memory: '{{ "{{ memory_request }}" }}'
                limits:
                  memory: '{{ "{{ memory_limit }}" }}'
                  {{- with (dig "limits" "cpu" "" $job.resources) }}
                  cpu: {{ . | quote }}
                  {{- end }}
                  {{- if $torchrun }}
                  {{- if gt $podGpus 0 }}
                  nvidia.com/gpu: {{ $podGpus }}
                  {{- end }}
                  {{- else if gt $gpus 0 }}
                  nvidia.com/gpu: '{{ "{{ gpu_count }}" }}'
                  {{- end }}
              {{- with .Values.securityContext }}
              securityContext:
                {{- toYaml . | nindent 16 }}
              {{- end }}
              volumeMounts:
                - name: dshm
                  mountPath: /dev/shm
                - name: tmp
                  mountPath: /tmp
                {{- if $job.dataVolume.claimName }}
                - name: data
                  mountPath: /data
                  readOnly: true
                {{- end }}
          volumes:
            # torch shares batches between processes through /dev/shm (64Mi by default);
            # NCCL's intra-node transport of a multi-GPU job needs it too.
            - name: dshm
              emptyDir:
                medium: Memory
                sizeLimit: {{ $job.shmSizeLimit }}
            - name: tmp
              emptyDir:
                sizeLimit: {{ $job.tmpSizeLimit }}
            {{- with $job.dataVolume.claimName }}
            - name: data
              persistentVolumeClaim:
                claimName: {{ . }}
                readOnly: true
            {{- end }}
  cluster_config: '{{ "{{ cluster_config }}" }}'
  job_watch_timeout_seconds: '{{ "{{ job_watch_timeout_seconds }}" }}'
  pod_watch_timeout_seconds: '{{ "{{ pod_watch_timeout_seconds }}" }}'
  stream_output: '{{ "{{ stream_output }}" }}'
variables:
  type: object
  properties:
    name:
      title: Name
      description: Name given to created Kubernetes jobs.
      type: string
    env:
      title: Environment Variables
      description: Extra environment variables of the job's container.
      type: object
      additionalProperties:
        type: string
    labels:
      title: Labels
      description: Labels of the created job.
      type: object
      additionalProperties:
        type: string
    command:
      title: Command
      description: "The command of the job's container (default: Prefect's flow-run entrypoint)."
      type: string
    namespace:
      title: Namespace
      description: Namespace of the cleaning jobs (the worker may create Jobs only here).
      type: string
      default: {{ .Release.Namespace | quote }}
    image:
      title: Image
      description: The noisescore worker image (torch, onnxruntime-gpu).
      type: string
      default: {{ include "noisescore.worker.image" . | quote }}
    image_pull_policy:
      title: Image Pull Policy
      type: string
      enum: [IfNotPresent, Always, Never]
      default: {{ .Values.worker.image.pullPolicy }}
    service_account_name:
      title: Service Account Name
      type: string
      default: {{ include "noisescore.suffixed" (list . "job") | quote }}
    {{- if and (gt $gpus 0) (not $torchrun) }}
    gpu_count:
      title: GPUs
      description: nvidia.com/gpu limit of a cleaning job.
      type: integer
      minimum: 1
      default: {{ $gpus }}
    {{- end }}
    cpu_request:
      title: CPU Request
      type: string
      default: {{ $job.resources.requests.cpu | toString | quote }}
    memory_request:
      title: Memory Request
      type: string
      default: {{ $job.resources.requests.memory | toString | quote }}
    memory_limit:
      title: Memory Limit
      type: string
      default: {{ $job.resources.limits.memory | toString | quote }}
    node_selector:
      title: Node Selector
      type: object
      additionalProperties:
        type: string
      default: {{ $job.nodeSelector | toJson }}
    tolerations:
      title: Tolerations
      type: array
      items:
        type: object
      default: {{ $job.tolerations | toJson }}
    affinity:
      title: Affinity
      type: object
      default: {{ $job.affinity | toJson }}
    finished_job_ttl:
      title: Finished Job TTL
      description: Seconds a finished job is kept before Kubernetes deletes it.
      type: integer
      default: {{ $job.ttlSecondsAfterFinished | int64 }}
    job_watch_timeout_seconds:
      title: Job Watch Timeout Seconds
      type: integer
    pod_watch_timeout_seconds:
      title: Pod Watch Timeout Seconds
      type: integer
      default: {{ $job.podWatchTimeoutSeconds | int64 }}
    stream_output:
      title: Stream Output
      type: boolean
      default: true
    cluster_config:
      title: Cluster Config
      description: The Kubernetes cluster config to use (in-cluster when unset).
      type: object
{{- end }}

{{/*
A count value that must be an integer >= 1, printed as an int; call with (list value "worker.job.x").
The schema says the same; this also holds under --skip-schema-validation.
*/}}
{{- define "noisescore.job.count" -}}
{{- $value := index . 0 }}
{{- $name := index . 1 }}
{{- $number := or (kindIs "float64" $value) (kindIs "int64" $value) (kindIs "int" $value) }}
{{- if not (and $number (eq (toString $value) (toString (int $value))) (ge (int $value) 1)) }}
{{- fail (printf "%s must be an integer >= 1 (got %#v)" $name $value) }}
{{- end }}
{{- int $value }}
{{- end }}

{{/*
"true" when cleaning jobs run under torchrun (worker.job.gpusPerJob > 1 or nodes > 1), else
"". Validates gpusPerJob, nodes and their agreement with worker.job.gpus.
*/}}
{{- define "noisescore.job.torchrun" -}}
{{- $job := .Values.worker.job }}
{{- $perPod := include "noisescore.job.count" (list $job.gpusPerJob "worker.job.gpusPerJob") | int }}
{{- $nodes := include "noisescore.job.count" (list $job.nodes "worker.job.nodes") | int }}
{{- if or (gt $perPod 1) (gt $nodes 1) }}
{{- $gpus := int $job.gpus }}
{{- if and (gt $gpus 1) (ne $gpus $perPod) }}
{{- fail (printf "worker.job.gpus (%d) disagrees with worker.job.gpusPerJob (%d): a torchrun job gives each pod gpusPerJob GPUs, one per process; leave gpus at 0 or 1, or set it to %d" $gpus $perPod $perPod) }}
{{- end }}
{{- print "true" }}
{{- end }}
{{- end }}

{{/*
nvidia.com/gpu of each pod of a torchrun job: one GPU per process (gpusPerJob); CPU
processes (gloo) only when gpus is 0 and gpusPerJob 1 (nodes > 1 CPU pods, e.g. on a dev
cluster).
*/}}
{{- define "noisescore.job.podGpus" -}}
{{- $job := .Values.worker.job }}
{{- ternary (int $job.gpusPerJob) 0 (or (gt (int $job.gpus) 0) (gt (int $job.gpusPerJob) 1)) }}
{{- end }}

{{/*
The headless Service whose name is the pods' subdomain in multi-node jobs.
*/}}
{{- define "noisescore.job.rendezvousService" -}}
{{- include "noisescore.suffixed" (list . "rdzv") }}
{{- end }}
