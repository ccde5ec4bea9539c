{
  # Development shell with the same package set as requirements.txt:  nix develop
  # nixpkgs' torch-bin / torchvision-bin are the CUDA-enabled binary builds.
  description = "biovis: interpretable, biodiversity-minded computer vision";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      system = "x86_64-linux";
      pkgs = import nixpkgs { inherit system; config.allowUnfree = true; };
      python = pkgs.python311;
      env = python.withPackages (ps: with ps; let
        # pytorch-fid (the TF-ported FID Inception network) is not in nixpkgs: built from its PyPI sdist.
        pytorch-fid = buildPythonPackage rec {
          pname = "pytorch-fid";
          version = "0.3.0";
          src = fetchPypi { inherit pname version; hash = "sha256-HIDREsnPXry8xCigt+phXDAoBa1ngOwp6OKVW6MVccg="; };
          propagatedBuildInputs = [ numpy pillow scipy torch-bin torchvision-bin ];
          doCheck = false;
        };
      in [
        torch-bin
        torchvision-bin
        numpy
        pillow
        typer
        rich
        pyyaml
        safetensors
        pandas
        matplotlib
        kagglehub
        h5py
        scikit-learn
        faiss
        transformers
        (lpips.override { torch = torch-bin; torchvision = torchvision-bin; })
        pytorch-fid
        pytest
        pytest-xdist
        selenium  # explore's browser tests, with chromium and chromedriver below
      ]);
    in {
      devShells.${system}.default = pkgs.mkShell {
        packages = [ env pkgs.ruff pkgs.chromium pkgs.chromedriver ];
        shellHook = ''
          export PYTHONPATH=$PWD:$PYTHONPATH
        '';
      };
    };
}
