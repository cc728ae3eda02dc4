variable "name" {
  description = "The cluster's name: its instances are NAME-1 … NAME-N, its security group NAME."
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

variable "image_id" {
  description = "The AMI built by packer/ (`packer build -only=anthill.amazon-ebs.debian`): Anthill installed, its unit waiting for a configuration."
  type        = string
}

variable "instance_type" {
  description = "The instances' type."
  type        = string
  default     = "m6i.large"
}

variable "vpc_id" {
  description = "The VPC the cluster runs in."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets, one per availability zone: node i goes to subnet i mod N, so the nodes spread over the zones."
  type        = list(string)
  validation {
    condition     = length(var.subnet_ids) >= 1
    error_message = "subnet_ids: at least one."
  }
}

variable "client_cidrs" {
  description = "Who may reach the gRPC port (7400) besides the nodes themselves."
  type        = list(string)
  default     = []
}

variable "metrics_cidrs" {
  description = "Who may scrape the metrics port (7401)."
  type        = list(string)
  default     = []
}

variable "ssh_cidrs" {
  description = "Who may reach SSH (22); empty: nobody (use SSM)."
  type        = list(string)
  default     = []
}

variable "ssh_key_name" {
  description = "An EC2 key pair for the instances' admin user, or null."
  type        = string
  default     = null
}

variable "data_volume_gb" {
  description = "The root volume's size (the event log lives in /var/lib/anthill)."
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
  description = "The nodes' Consul ACL token (coordination `consul`); written to /etc/anthill/consul-token by cloud-init. It is in the instances' user data: prefer an instance role that reads it from a secret store."
  type        = string
  default     = ""
  sensitive   = true
}

variable "config_overrides" {
  description = "Merged over each node's configuration."
  type        = any
  default     = {}
}

variable "tags" {
  description = "Tags on everything the module makes."
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
