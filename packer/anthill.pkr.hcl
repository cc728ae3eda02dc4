# The Anthill image (docs/images.md): one recipe, several sources. Each source boots a Debian 12
# machine; the same provisioners install Anthill with the anthill role (packer/image.yml) and
# strip the machine's identity; each source then keeps the result in its own way.
#
# - `null.lab`: a throwaway host of the bare-metal lab, over SSH; its root filesystem is exported
#   as `rootfs.tar` with a manifest, which the lab boots (tests/e2e/lab/image.sh builds it, and
#   the lab's end-to-end run uses it). Built for real on every CI run.
# - `amazon-ebs.debian`, `googlecompute.debian`: an AMI and a GCE image, for the cloud modules
#   (terraform/modules/anthill-aws, anthill-gcp). Written to run; docs/images.md says what was
#   checked here.
#
# packer build -only=null.lab …          the lab image (tests/e2e/lab/image.sh does it all)
# packer build -only=amazon-ebs.debian -var aws_region=eu-west-1 -var anthill_binary=… .

packer {
  required_version = ">= 1.14.0"
  required_plugins {
    ansible = {
      version = ">= 1.1.2"
      source  = "github.com/hashicorp/ansible"
    }
    amazon = {
      version = ">= 1.3.6"
      source  = "github.com/hashicorp/amazon"
    }
    googlecompute = {
      version = ">= 1.1.9"
      source  = "github.com/hashicorp/googlecompute"
    }
  }
}

variable "anthill_binary" {
  description = "The `anthill` binary baked into the image (a file on the machine running Packer)."
  type        = string
}

variable "anthill_version" {
  description = "Its version: the image's name and the folder it is installed in (/opt/anthill/VERSION)."
  type        = string
}

variable "ansible_playbook" {
  description = "The `ansible-playbook` program the ansible provisioner runs."
  type        = string
  default     = "ansible-playbook"
}

variable "lab_host" {
  description = "lab source: the throwaway lab host's address."
  type        = string
  default     = "10.77.0.11"
}

variable "lab_host_name" {
  description = "lab source: its name (the lab's folder for it)."
  type        = string
  default     = "host-01"
}

variable "lab_ssh_key" {
  description = "lab source: the key root logs in with."
  type        = string
  default     = "/tmp/anthill-metallab/id_ed25519"
}

variable "output_dir" {
  description = "lab source: where rootfs.tar and manifest.json go."
  type        = string
  default     = "output/lab"
}

variable "aws_region" {
  description = "amazon-ebs source: the region the AMI is built in."
  type        = string
  default     = "eu-west-1"
}

variable "aws_instance_type" {
  description = "amazon-ebs source: the builder instance's type."
  type        = string
  default     = "t3.small"
}

variable "gcp_project_id" {
  description = "googlecompute source: the project the image is built in."
  type        = string
  default     = "my-project"
}

variable "gcp_zone" {
  description = "googlecompute source: the builder instance's zone."
  type        = string
  default     = "europe-west1-b"
}

locals {
  # anthill-0-1-0-20261202235959: image names allow neither dots nor upper case on GCE.
  image_name = "anthill-${replace(var.anthill_version, ".", "-")}-${formatdate("YYYYMMDDhhmmss", timestamp())}"
}

source "amazon-ebs" "debian" {
  region        = var.aws_region
  instance_type = var.aws_instance_type
  ami_name      = local.image_name
  ssh_username  = "admin"
  source_ami_filter {
    # Debian's own account publishes the official Debian 12 AMIs.
    owners      = ["136693071363"]
    most_recent = true
    filters = {
      name                  = "debian-12-amd64-*"
      "virtualization-type" = "hvm"
      "root-device-type"    = "ebs"
    }
  }
  tags = {
    Name              = local.image_name
    "anthill:version" = var.anthill_version
  }
}

source "googlecompute" "debian" {
  project_id          = var.gcp_project_id
  zone                = var.gcp_zone
  source_image_family = "debian-12"
  image_name          = local.image_name
  image_family        = "anthill"
  ssh_username        = "packer"
  image_labels = {
    anthill_version = replace(var.anthill_version, ".", "-")
  }
}

source "null" "lab" {
  communicator         = "ssh"
  ssh_host             = var.lab_host
  ssh_username         = "root"
  ssh_private_key_file = var.lab_ssh_key
  ssh_timeout          = "2m"
}

build {
  name    = "anthill"
  sources = ["source.null.lab", "source.amazon-ebs.debian", "source.googlecompute.debian"]

  provisioner "ansible" {
    command         = var.ansible_playbook
    playbook_file   = "${path.root}/image.yml"
    user            = build.User
    use_proxy       = false
    extra_arguments = ["-e", "anthill_binary_src=${var.anthill_binary}", "-e", "anthill_version=${var.anthill_version}"]
    ansible_env_vars = [
      "ANSIBLE_ROLES_PATH=${path.root}/../ansible/roles",
      "ANSIBLE_HOST_KEY_CHECKING=False",
      "ANSIBLE_PIPELINING=True",
      "ANSIBLE_PYTHON_INTERPRETER=auto_silent",
    ]
  }

  provisioner "shell" {
    script          = "${path.root}/strip-host-identity.sh"
    execute_command = "sudo sh -c '{{ .Vars }} {{ .Path }}'"
  }

  post-processor "shell-local" {
    only   = ["null.lab"]
    inline = ["bash '${path.root}/export-lab-rootfs.sh' '${var.lab_host_name}' '${var.output_dir}' '${var.anthill_version}'"]
  }
}
