variable "hcloud_token" {
  description = "A Hetzner Cloud API token (read and write)."
  type        = string
  sensitive   = true
}

variable "image" {
  description = "The snapshot holding Anthill (docs/images.md), by id or name."
  type        = string
}

variable "client_cidrs" {
  description = "The clients' networks (on the public addresses)."
  type        = list(string)
  default     = []
}

variable "ssh_cidrs" {
  description = "Who may reach SSH."
  type        = list(string)
  default     = []
}

variable "ssh_keys" {
  description = "SSH keys for root (names or ids)."
  type        = list(string)
  default     = []
}
