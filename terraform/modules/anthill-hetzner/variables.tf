variable "name" {
  description = "The cluster's name: its servers are NAME-1 … NAME-N; its network, firewall and placement group NAME."
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

variable "image" {
  description = "The snapshot holding Anthill (installed by packer/image.yml, its unit waiting for a configuration), by id or name."
  type        = string
}

variable "server_type" {
  description = "The servers' type."
  type        = string
  default     = "ccx13"
}

variable "locations" {
  description = "Locations of one network zone: node i goes to location i mod N (eu-central: fsn1, nbg1, hel1)."
  type        = list(string)
  default     = ["fsn1", "nbg1", "hel1"]
}

variable "network_zone" {
  description = "The network zone of `locations`."
  type        = string
  default     = "eu-central"
}

variable "ip_range" {
  description = "The cluster's private network; node i gets address 10 + i in it, and the nodes talk over it."
  type        = string
  default     = "10.77.0.0/24"
  validation {
    condition     = can(cidrhost(var.ip_range, 32))
    error_message = "ip_range: an IPv4 network with room for the nodes (at least a /26)."
  }
}

variable "client_cidrs" {
  description = "Who may reach the gRPC port (7400) on the public addresses (Hetzner's firewalls do not filter the private network, where the nodes talk)."
  type        = list(string)
  default     = []
}

variable "metrics_cidrs" {
  description = "Who may scrape the metrics port (7401) on the public addresses."
  type        = list(string)
  default     = []
}

variable "ssh_cidrs" {
  description = "Who may reach SSH (22)."
  type        = list(string)
  default     = []
}

variable "ssh_keys" {
  description = "SSH keys (names or ids) for root."
  type        = list(string)
  default     = []
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

variable "labels" {
  description = "Labels on everything the module makes."
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
