variable "name" {
  description = "The cluster's name: its instances are NAME-1 … NAME-N, its firewall rules and network tag NAME."
  type        = string
  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{0,30}$", var.name))
    error_message = "name: lower-case letters, digits and dashes, starting with a letter, at most 31."
  }
}

variable "nodes" {
  description = "How many nodes; raft ids are 1 … N. Changing it later is not a safe way to add or remove nodes (docs/clouds.md, limits)."
  type        = number
  default     = 3
  validation {
    condition     = var.nodes >= 1 && var.nodes <= 12 && floor(var.nodes) == var.nodes
    error_message = "nodes: 1 to 12."
  }
}

variable "founders" {
  description = "How many of the first nodes found the cluster: 1 to `nodes`, recorded at the first apply (nodes added later join)."
  type        = number
  default     = 3
}

variable "project" {
  description = "The GCP project."
  type        = string
}

variable "region" {
  description = "The region of the subnetwork and the addresses."
  type        = string
}

variable "zones" {
  description = "Zones of the region: node i goes to zone i mod N, so the nodes spread over them."
  type        = list(string)
  validation {
    condition     = length(var.zones) >= 1
    error_message = "zones: at least one."
  }
}

variable "image" {
  description = "The image built by packer/ (`packer build -only=anthill.googlecompute.debian`), e.g. `projects/P/global/images/family/anthill`."
  type        = string
}

variable "machine_type" {
  description = "The instances' machine type."
  type        = string
  default     = "n2-standard-2"
}

variable "network" {
  description = "The VPC network (for the firewall rules)."
  type        = string
}

variable "subnetwork" {
  description = "The subnetwork of `region` the nodes get their internal addresses in."
  type        = string
}

variable "client_ranges" {
  description = "Who may reach the gRPC port (7400) besides the nodes themselves."
  type        = list(string)
  default     = []
}

variable "metrics_ranges" {
  description = "Who may scrape the metrics port (7401)."
  type        = list(string)
  default     = []
}

variable "ssh_ranges" {
  description = "Who may reach SSH (22); empty: nobody (use IAP)."
  type        = list(string)
  default     = []
}

variable "disk_gb" {
  description = "The boot disk's size (the event log lives in /var/lib/anthill)."
  type        = number
  default     = 100
}

variable "partitions" {
  description = "How the event log is split; fixed once the cluster exists."
  type        = number
  default     = 16
}

variable "replication_factor" {
  description = "Nodes holding each partition."
  type        = number
  default     = 3
}

variable "coordination" {
  description = "`embedded` (default), or `consul` with the address of a Consul the instances reach (the image runs no Consul agent: give a server or load balancer address) and the key prefix (the token from `consul_token`)."
  type = object({
    kind              = optional(string, "embedded")
    consul_address    = optional(string, "http://127.0.0.1:8500")
    consul_key_prefix = optional(string, "anthill/")
  })
  default = {}
}

variable "consul_token" {
  description = "The nodes' Consul ACL token (coordination `consul`); written to /etc/anthill/consul-token by the startup script. It is in the instances' metadata: prefer a service account that reads it from Secret Manager."
  type        = string
  default     = ""
  sensitive   = true
}

variable "config_overrides" {
  description = "Merged over each node's configuration."
  type        = any
  default     = {}
}

variable "labels" {
  description = "Labels on the instances."
  type        = map(string)
  default     = {}
}

variable "tls" {
  description = <<-EOT
    TLS, on by default (docs/clouds.md "TLS"): `dir` on the machine running Terraform (empty:
    `anthill-tls` beside the root module) holds the cluster CA `ca.crt`, each node's
    `<name>-<i>.crt` and `.key`, and the administrator's `admin.crt` and `.key`, made before the
    first apply with `anthill certs` (the plan names what is missing and how to make it). Every
    node's certificate carries `server_name` too (empty: `name`), which clients check it against
    (`--tls-server-name`: the certificates are made before the machines have addresses). Written
    to the machines at first boot only, like the rest of their configuration.
  EOT
  type = object({
    enabled     = optional(bool, true)
    dir         = optional(string, "")
    server_name = optional(string, "")
  })
  default = {}
}
