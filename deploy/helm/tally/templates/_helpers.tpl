{{/* Names ------------------------------------------------------------------------------ */}}

{{- define "tally.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains "tally" .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-tally" .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The name of one service's objects: tally-wallet. Call with (list $ "wallet"). */}}
{{- define "tally.svcName" -}}
{{- printf "%s-%s" (include "tally.fullname" (index . 0)) (index . 1) -}}
{{- end -}}

{{- define "tally.kafkaCluster" -}}
{{- .Values.kafka.clusterName | default (printf "%s-kafka" (include "tally.fullname" .)) -}}
{{- end -}}

{{- define "tally.dbCluster" -}}
{{- printf "%s-db" (include "tally.fullname" .) -}}
{{- end -}}

{{/* Labels ----------------------------------------------------------------------------- */}}

{{- define "tally.labels" -}}
app.kubernetes.io/part-of: tally
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* What a pod of the release carries, and what NetworkPolicies select on. */}}
{{- define "tally.selectorLabels" -}}
app.kubernetes.io/part-of: tally
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of one service's objects. Call with (list $ "wallet"). */}}
{{- define "tally.svcLabels" -}}
{{ include "tally.labels" (index . 0) }}
app.kubernetes.io/name: {{ index . 1 }}
app.kubernetes.io/component: service
{{- end -}}

{{- define "tally.svcSelector" -}}
{{ include "tally.selectorLabels" (index . 0) }}
app.kubernetes.io/name: {{ index . 1 }}
{{- end -}}

{{/* Images ----------------------------------------------------------------------------- */}}

{{/* One service's image: <repository>-<service> (or <repository> alone when
     image.perService is false), then @digest when a digest is given, else :tag.
     Call with (list $ "wallet"). */}}
{{- define "tally.image" -}}
{{- $root := index . 0 -}}
{{- $name := index . 1 -}}
{{- $img := $root.Values.image -}}
{{- $svc := index $root.Values.services $name | default dict -}}
{{- $own := $svc.image | default dict -}}
{{- $repo := $own.repository | default (ternary (printf "%s-%s" $img.repository $name) $img.repository $img.perService) -}}
{{- $tag := $own.tag | default $img.tag | default $root.Chart.AppVersion -}}
{{- $digest := $own.digest | default (ternary "" $img.digest $img.perService) -}}
{{- if $digest -}}
{{- if not (regexMatch "^sha256:[a-f0-9]{64}$" $digest) -}}
{{- fail (printf "image digest of %s must be sha256:<64 hex digits>, got %q" $name $digest) -}}
{{- end -}}
{{- printf "%s@%s" $repo $digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (toString $tag) -}}
{{- end -}}
{{- end -}}

{{/* Kafka ------------------------------------------------------------------------------ */}}

{{- define "tally.kafkaBootstrap" -}}
{{- if .Values.kafka.enabled -}}
{{- printf "%s-kafka-bootstrap:%d" (include "tally.kafkaCluster" .) (int (ternary 9093 9092 .Values.kafka.security.enabled)) -}}
{{- else -}}
{{- required "kafka.bootstrapServers is required when kafka.enabled is false" .Values.kafka.bootstrapServers -}}
{{- end -}}
{{- end -}}

{{/* Topic resource name: usage.ingest -> tally-usage-ingest. Call with (list $ "usage.ingest"). */}}
{{- define "tally.topicResource" -}}
{{- printf "%s-%s" (include "tally.fullname" (index . 0)) (index . 1 | replace "." "-" | replace "_" "-") -}}
{{- end -}}

{{/* Database --------------------------------------------------------------------------- */}}

{{- define "tally.dbSecretName" -}}
{{- if .Values.postgres.enabled -}}
{{- printf "%s-app" (include "tally.dbCluster" .) -}}
{{- else -}}
{{- required "database.existingSecret is required when postgres.enabled is false" .Values.database.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "tally.secretsName" -}}
{{- .Values.secrets.existingSecret | default (printf "%s-secrets" (include "tally.fullname" .)) -}}
{{- end -}}

{{- define "tally.stripeSecretName" -}}
{{- .Values.secrets.stripe.existingSecret | default (printf "%s-stripe" (include "tally.fullname" .)) -}}
{{- end -}}

{{/* Monitoring ------------------------------------------------------------------------- */}}

{{- define "tally.monitoringLabels" -}}
{{ include "tally.labels" . }}
{{- with .Values.monitoring.labels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Services in a regex alternation: usage-meter|wallet|... */}}
{{- define "tally.serviceAlternation" -}}
{{- $names := list -}}
{{- range $name, $svc := .Values.services -}}
{{- if $svc.enabled -}}{{- $names = append $names $name -}}{{- end -}}
{{- end -}}
{{- join "|" $names -}}
{{- end -}}

{{/* Consumer groups in a regex alternation. */}}
{{- define "tally.groupAlternation" -}}
{{- $groups := list -}}
{{- range $name, $svc := .Values.services -}}
{{- if $svc.enabled -}}
{{- range $svc.kafka.consumes -}}{{- $groups = append $groups .group -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- join "|" $groups -}}
{{- end -}}

{{- define "tally.runbook" -}}
{{- printf "%s#%s" (index . 0).Values.monitoring.runbookBaseUrl (index . 1 | lower) -}}
{{- end -}}

{{/* Front door ------------------------------------------------------------------------- */}}

{{/* Every public path of API.md, by the service that serves it: the one table the HTTPRoute
     and the Ingress are generated from. Exact and PathPrefix where a path has a prefix of its
     own; anchored regular expressions where the service is told apart after an id
     (/v1/accounts/{aid}/wallet is the wallet, /v1/accounts/{aid}/wallet/top-ups recharge).
     The expressions never overlap, so no precedence rule decides between services. */}}
{{- define "tally.routes" -}}
usage-meter:
  - {type: PathPrefix, value: /v1/usage}
  - {type: PathPrefix, value: /v1/prices}
  - {type: Exact, value: /v1/openapi.json}  # the whole API's document (every service serves it)
wallet:
  - {type: RegularExpression, value: "^/v1/(companies|accounts)/[^/]+/wallet(/transactions)?$"}
  - {type: RegularExpression, value: "^/v1/(companies|accounts)/[^/]+/wallet/credits$"}
  - {type: RegularExpression, value: "^/v1/(companies|accounts)/[^/]+/credit-requests$"}
  - {type: RegularExpression, value: "^/v1/accounts/[^/]+/service-status$"}
  - {type: PathPrefix, value: /v1/credit-requests}
recharge:
  - {type: RegularExpression, value: "^/v1/(companies|accounts)/[^/]+/payment-methods(/[^/]+(/default)?)?$"}
  - {type: RegularExpression, value: "^/v1/(companies|accounts)/[^/]+/wallet/(top-ups|recharges)$"}
  - {type: PathPrefix, value: /v1/stripe/webhooks}
rebilling:
  - {type: Exact, value: /v1/companies}
  - {type: RegularExpression, value: "^/v1/(companies|accounts)/[^/]+$"}
  - {type: RegularExpression, value: "^/v1/companies/[^/]+/(plan|stripe-connect|accounts|saas-plans|licenses|seat-price)$"}
  - {type: RegularExpression, value: "^/v1/companies/[^/]+/reselling(/[^/]+)?$"}
  - {type: RegularExpression, value: "^/v1/accounts/[^/]+/(rebilling|subscriptions|licenses|invitations|members)$"}
  - {type: PathPrefix, value: /v1/subscriptions}
  - {type: PathPrefix, value: /v1/invitations}
notifier:
  - {type: RegularExpression, value: "^/v1/accounts/[^/]+/(usage-alerts|usage)$"}
  - {type: RegularExpression, value: "^/v1/companies/[^/]+/(notifications|webhook-endpoints)$"}
  - {type: PathPrefix, value: /v1/notifications}
  - {type: PathPrefix, value: /v1/webhook-endpoints}
  - {type: PathPrefix, value: /v1/webhook-deliveries}
{{- end -}}
