variable "region" {
  description = "The region (the AMI must be in it)."
  type        = string
  default     = "eu-west-1"
}

variable "image_id" {
  description = "The AMI of `packer build -only=anthill.amazon-ebs.debian packer`."
  type        = string
}

variable "vpc_id" {
  description = "The VPC."
  type        = string
}

variable "subnet_ids" {
  description = "Three private subnets, one per availability zone."
  type        = list(string)
}

variable "client_cidrs" {
  description = "The clients' networks."
  type        = list(string)
  default     = ["10.0.0.0/8"]
}
