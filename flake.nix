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
      env = python.withPackages (ps: with ps; [
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
        pytest
      ]);
    in {
      devShells.${system}.default = pkgs.mkShell {
        packages = [ env pkgs.ruff ];
        shellHook = ''
          export PYTHONPATH=$PWD:$PYTHONPATH
        '';
      };
    };
}
