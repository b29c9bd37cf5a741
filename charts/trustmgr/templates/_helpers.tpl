{{/* Names ------------------------------------------------------------------ */}}

{{- define "trustmgr.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "trustmgr.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "trustmgr.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "trustmgr.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "trustmgr.stateName" -}}
{{- default (printf "%s-state" (include "trustmgr.fullname" .)) .Values.stateStore.kubernetes.name }}
{{- end }}

{{- define "trustmgr.leaderLeaseName" -}}
{{- default (printf "%s-leader" (include "trustmgr.fullname" .)) .Values.daemon.leaderElectionLeaseName }}
{{- end }}

{{- define "trustmgr.configMapName" -}}
{{- default (include "trustmgr.fullname" .) .Values.existingConfigMap }}
{{- end }}

{{/* Labels ----------------------------------------------------------------- */}}

{{- define "trustmgr.selectorLabels" -}}
app.kubernetes.io/name: {{ include "trustmgr.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "trustmgr.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "trustmgr.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: {{ .Values.mode }}
{{- end }}

{{- define "trustmgr.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* What the configuration asks of this cluster ---------------------------- */}}

{{/*
The in-cluster targets, as JSON {"targets": [{namespace, secretName,
istiodDeployment, restartIstiod}]}: every cluster of `config` with
kubernetes.inCluster true, then rbac.targets.
*/}}
{{- define "trustmgr.targets" -}}
{{- $found := list }}
{{- $meshes := .Values.config.meshes | default dict }}
{{- range $meshName := keys $meshes | sortAlpha }}
{{- $mesh := get $meshes $meshName }}
{{- if kindIs "map" $mesh }}
{{- $clusters := $mesh.clusters | default dict }}
{{- range $clusterName := keys $clusters | sortAlpha }}
{{- $cluster := get $clusters $clusterName }}
{{- if and (kindIs "map" $cluster) (kindIs "map" $cluster.kubernetes) }}
{{- if $cluster.kubernetes.inCluster }}
{{- $istio := $cluster.istio | default dict }}
{{- $found = append $found (dict "namespace" ($cluster.kubernetes.namespace | default "istio-system") "secretName" ($cluster.kubernetes.secretName | default "cacerts") "istiodDeployment" ($cluster.kubernetes.istiodDeployment | default "istiod") "restartIstiod" ($istio.restartIstiod | default false)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- range $target := .Values.rbac.targets }}
{{- $found = append $found (dict "namespace" ($target.namespace | default "istio-system") "secretName" ($target.secretName | default "cacerts") "istiodDeployment" ($target.istiodDeployment | default "istiod") "restartIstiod" ($target.restartIstiod | default false)) }}
{{- end }}
{{- toJson (dict "targets" $found) }}
{{- end }}

{{/*
The in-cluster targets grouped by namespace, as JSON {namespace: {"secrets":
[...], "deployments": [...]}}: the Secrets trustmgr reads and replaces there
(each cacerts and its -trustmgr-previous copy) and the istiod Deployments it
restarts.
*/}}
{{- define "trustmgr.targetNamespaces" -}}
{{- $byNamespace := dict }}
{{- range $target := (include "trustmgr.targets" . | fromJson).targets }}
{{- $entry := get $byNamespace $target.namespace | default (dict "secrets" (list) "deployments" (list)) }}
{{- $secrets := concat $entry.secrets (list $target.secretName (printf "%s-trustmgr-previous" $target.secretName)) }}
{{- $deployments := $entry.deployments }}
{{- if $target.restartIstiod }}
{{- $deployments = append $deployments $target.istiodDeployment }}
{{- end }}
{{- $_ := set $byNamespace $target.namespace (dict "secrets" ($secrets | uniq | sortAlpha) "deployments" ($deployments | uniq | sortAlpha)) }}
{{- end }}
{{- toJson $byNamespace }}
{{- end }}

{{- define "trustmgr.leaderElection" -}}
{{- if and (eq .Values.mode "daemon") (gt (int .Values.daemon.replicas) 1) }}true{{ end }}
{{- end }}

{{/* The pod reaches its own cluster's API: state Secret, Lease, cacerts; the agent always. */}}
{{- define "trustmgr.usesKubeApi" -}}
{{- if eq .Values.mode "agent" }}true
{{- else }}
{{- $targets := (include "trustmgr.targets" . | fromJson).targets }}
{{- if or (eq .Values.stateStore.type "kubernetes") $targets (include "trustmgr.leaderElection" .) }}true{{ end }}
{{- end }}
{{- end }}

{{/* trustmgr.yaml: `config` with stateStore and daemon written by the chart. */}}
{{- define "trustmgr.config" -}}
{{- $config := deepCopy (.Values.config | default dict) }}
{{- if eq .Values.stateStore.type "kubernetes" }}
{{- $_ := set $config "stateStore" (dict "kubernetes" (dict "namespace" .Release.Namespace "name" (include "trustmgr.stateName" .) "inCluster" true)) }}
{{- else }}
{{- $_ := set $config "stateStore" (dict "vault" (deepCopy .Values.stateStore.vault)) }}
{{- end }}
{{- if eq .Values.mode "daemon" }}
{{- $daemon := dict "interval" .Values.daemon.interval "jitter" .Values.daemon.jitter "listen" (printf "0.0.0.0:%d" (int .Values.daemon.port)) }}
{{- if include "trustmgr.leaderElection" . }}
{{- $_ := set $daemon "leaderElection" (dict "namespace" .Release.Namespace "name" (include "trustmgr.leaderLeaseName" .) "inCluster" true) }}
{{- end }}
{{- $_ := set $config "daemon" $daemon }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/* agent.yaml, the agent's own file (trustmgr.agent.config.AgentConfig), from `agent`. */}}
{{- define "trustmgr.agentConfig" -}}
{{- $agent := .Values.agent }}
{{- $kubernetes := dict "inCluster" true "namespace" $agent.namespace "secretName" $agent.secretName "istiodDeployment" $agent.istiodDeployment }}
{{- $config := dict "cluster" $agent.cluster "publisherKey" $agent.publisherKey "kubernetes" $kubernetes "interval" $agent.interval "jitter" $agent.jitter }}
{{- with $agent.istio }}
{{- $_ := set $config "istio" (deepCopy .) }}
{{- end }}
{{- with $agent.providers }}
{{- $_ := set $config "providers" (deepCopy .) }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/* The file the pod reads: agent.yaml in mode agent, trustmgr.yaml otherwise. */}}
{{- define "trustmgr.podConfig" -}}
{{- if eq .Values.mode "agent" }}
{{- include "trustmgr.agentConfig" . }}
{{- else }}
{{- include "trustmgr.config" . }}
{{- end }}
{{- end }}

{{/* The pod ------------------------------------------------------------------ */}}

{{/* The pod spec; call with (dict "root" $ "args" (list ...)). */}}
{{- define "trustmgr.podSpec" -}}
{{- $root := .root }}
{{- with $root -}}
serviceAccountName: {{ include "trustmgr.serviceAccountName" . }}
automountServiceAccountToken: false
enableServiceLinks: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
securityContext:
  runAsNonRoot: true
  {{- with .Values.securityContext.runAsUser }}
  runAsUser: {{ int . }}
  {{- end }}
  {{- with .Values.securityContext.runAsGroup }}
  runAsGroup: {{ int . }}
  {{- end }}
  {{- with .Values.securityContext.fsGroup }}
  fsGroup: {{ int . }}
  {{- end }}
  seccompProfile:
    type: RuntimeDefault
containers:
  - name: trustmgr
    image: {{ include "trustmgr.image" . | quote }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command: [trustmgr]
    args:
      {{- toYaml $.args | nindent 6 }}
    {{- with .Values.extraEnv }}
    env:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- if eq .Values.mode "daemon" }}
    ports:
      - name: http-metrics
        containerPort: {{ int .Values.daemon.port }}
        protocol: TCP
    livenessProbe:
      httpGet:
        path: /healthz
        port: http-metrics
      {{- toYaml .Values.daemon.livenessProbe | nindent 6 }}
    readinessProbe:
      httpGet:
        path: /readyz
        port: http-metrics
      {{- toYaml .Values.daemon.readinessProbe | nindent 6 }}
    {{- end }}
    securityContext:
      runAsNonRoot: true
      allowPrivilegeEscalation: false
      readOnlyRootFilesystem: true
      capabilities:
        drop: [ALL]
      seccompProfile:
        type: RuntimeDefault
    resources:
      {{- toYaml .Values.resources | nindent 6 }}
    volumeMounts:
      {{- if eq .Values.mode "agent" }}
      - name: config
        mountPath: /etc/trustmgr/agent.yaml
        subPath: agent.yaml
        readOnly: true
      {{- else }}
      - name: config
        mountPath: /etc/trustmgr/config
        readOnly: true
      {{- end }}
      - name: tmp
        mountPath: /tmp
      {{- if include "trustmgr.usesKubeApi" . }}
      - name: kube-api-access
        mountPath: /var/run/secrets/kubernetes.io/serviceaccount
        readOnly: true
      {{- end }}
      {{- if .Values.passphrase.existingSecret }}
      - name: passphrase
        mountPath: /etc/trustmgr/passphrase
        readOnly: true
      {{- end }}
      {{- if .Values.vault.kubernetesAuth.enabled }}
      - name: vault-sa-token
        mountPath: /var/run/secrets/trustmgr/vault
        readOnly: true
      {{- end }}
      {{- if .Values.vault.token.existingSecret }}
      - name: vault-token
        mountPath: /etc/trustmgr/vault-token
        readOnly: true
      {{- end }}
      {{- if .Values.vault.appRole.existingSecret }}
      - name: vault-approle
        mountPath: /etc/trustmgr/vault-approle
        readOnly: true
      {{- end }}
      {{- range $index, $remote := .Values.remoteClusters }}
      - name: kubeconfig-{{ $index }}
        mountPath: /etc/trustmgr/kubeconfigs/{{ $remote.kubeconfigSecret }}
        readOnly: true
      {{- end }}
      {{- with .Values.extraVolumeMounts }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
volumes:
  - name: config
    configMap:
      name: {{ include "trustmgr.configMapName" . }}
      {{- $file := ternary "agent.yaml" "trustmgr.yaml" (eq .Values.mode "agent") }}
      items:
        - key: {{ $file }}
          path: {{ $file }}
  - name: tmp
    emptyDir:
      medium: Memory
      sizeLimit: {{ .Values.tmpSizeLimit }}
  {{- if include "trustmgr.usesKubeApi" . }}
  - name: kube-api-access
    projected:
      sources:
        - serviceAccountToken:
            path: token
            expirationSeconds: 3607
        - configMap:
            name: kube-root-ca.crt
            items:
              - key: ca.crt
                path: ca.crt
        - downwardAPI:
            items:
              - path: namespace
                fieldRef:
                  apiVersion: v1
                  fieldPath: metadata.namespace
  {{- end }}
  {{- if .Values.passphrase.existingSecret }}
  - name: passphrase
    secret:
      secretName: {{ .Values.passphrase.existingSecret }}
      defaultMode: 0440
      items:
        - key: {{ .Values.passphrase.key }}
          path: passphrase
  {{- end }}
  {{- if .Values.vault.kubernetesAuth.enabled }}
  - name: vault-sa-token
    projected:
      sources:
        - serviceAccountToken:
            path: token
            audience: {{ .Values.vault.kubernetesAuth.audience }}
            expirationSeconds: {{ int .Values.vault.kubernetesAuth.expirationSeconds }}
  {{- end }}
  {{- if .Values.vault.token.existingSecret }}
  - name: vault-token
    secret:
      secretName: {{ .Values.vault.token.existingSecret }}
      defaultMode: 0440
      items:
        - key: {{ .Values.vault.token.key }}
          path: token
  {{- end }}
  {{- if .Values.vault.appRole.existingSecret }}
  - name: vault-approle
    secret:
      secretName: {{ .Values.vault.appRole.existingSecret }}
      defaultMode: 0440
      items:
        - key: {{ .Values.vault.appRole.roleIdKey }}
          path: role-id
        - key: {{ .Values.vault.appRole.secretIdKey }}
          path: secret-id
  {{- end }}
  {{- range $index, $remote := .Values.remoteClusters }}
  - name: kubeconfig-{{ $index }}
    secret:
      secretName: {{ $remote.kubeconfigSecret }}
      defaultMode: 0440
  {{- end }}
  {{- with .Values.extraVolumes }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
{{- end }}

{{/* Values that the schema cannot judge alone. */}}
{{- define "trustmgr.validate" -}}
{{- if eq .Values.mode "agent" }}
{{- include "trustmgr.validateAgent" . }}
{{- else }}
{{- if .Values.agent.cluster }}
{{- fail (printf "agent.cluster is set but mode is %s; set mode: agent to run the agent in this cluster, or drop agent" .Values.mode) }}
{{- end }}
{{- if and (not .Values.existingConfigMap) (not .Values.config.meshes) }}
{{- fail "set config (providers and meshes, as in docs/configuration.md) or existingConfigMap" }}
{{- end }}
{{- if and .Values.existingConfigMap (or .Values.config.providers .Values.config.meshes) }}
{{- fail "set config or existingConfigMap, not both" }}
{{- end }}
{{- if and (eq .Values.stateStore.type "vault") (not .Values.stateStore.vault.address) }}
{{- fail "stateStore.type vault needs stateStore.vault.address" }}
{{- end }}
{{- if and (eq .Values.stateStore.type "kubernetes") .Values.stateStore.vault }}
{{- fail "stateStore.vault is set but stateStore.type is kubernetes; set type: vault, or drop stateStore.vault" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Mode agent: what it needs, and the central run's values, which it would silently ignore. */}}
{{- define "trustmgr.validateAgent" -}}
{{- $agent := .Values.agent }}
{{- if not $agent.cluster }}
{{- fail "mode agent needs agent.cluster: this cluster's name in the central configuration (the cluster whose mode is agent there)" }}
{{- end }}
{{- if not (trim $agent.publisherKey) }}
{{- fail "mode agent needs agent.publisherKey: the PEM public key that `trustmgr agent publisher-key` prints where the central run runs" }}
{{- end }}
{{- if contains "PRIVATE KEY" $agent.publisherKey }}
{{- fail "agent.publisherKey holds a PRIVATE key; it would be readable in a ConfigMap. Give the agent only the public key that `trustmgr agent publisher-key` prints, and keep the private key with the central run" }}
{{- end }}
{{- if not (regexMatch `^\s*-----BEGIN PUBLIC KEY-----\s+[A-Za-z0-9+/=\s]+-----END PUBLIC KEY-----\s*$` $agent.publisherKey) }}
{{- fail "agent.publisherKey is not one PEM public key (-----BEGIN PUBLIC KEY----- ... -----END PUBLIC KEY-----); use what `trustmgr agent publisher-key` prints" }}
{{- end }}
{{- if or .Values.config .Values.existingConfigMap }}
{{- fail "mode agent does not read config or existingConfigMap: meshes, providers and rotation stay with the central run; the agent's own settings are under agent" }}
{{- end }}
{{- if or (ne .Values.stateStore.type "kubernetes") .Values.stateStore.kubernetes.name .Values.stateStore.vault }}
{{- fail "mode agent keeps no state store (its own record is the Secret trustmgr-agent beside cacerts); drop stateStore" }}
{{- end }}
{{- if .Values.passphrase.existingSecret }}
{{- fail "mode agent holds no root key and needs no passphrase; drop passphrase.existingSecret" }}
{{- end }}
{{- if .Values.remoteClusters }}
{{- fail "mode agent writes only the cluster it runs in; drop remoteClusters (each cluster runs its own agent)" }}
{{- end }}
{{- if .Values.rbac.targets }}
{{- fail "mode agent grants its own Role in agent.namespace, from agent.secretName and agent.istio; drop rbac.targets" }}
{{- end }}
{{- end }}
