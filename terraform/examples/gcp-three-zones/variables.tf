variable "project" {
  description = "The project (its `anthill` image family holds the images of packer/)."
  type        = string
}

variable "region" {
  description = "The region; the nodes go to its zones a, b and c."
  type        = string
  default     = "europe-west1"
}

variable "network" {
  description = "The VPC network."
  type        = string
  default     = "default"
}

variable "subnetwork" {
  description = "The region's subnetwork."
  type        = string
  default     = "default"
}

variable "client_ranges" {
  description = "The clients' networks."
  type        = list(string)
  default     = ["10.0.0.0/8"]
}
