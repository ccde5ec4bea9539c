"""Generation, Phylo-NN: the run's Newick tree drawn as a clickable tree; clicking a node samples from it with
`generate phylo --node` semantics (every image draws all its codes from the prior given the node), through the
same `sample_node`, so the images are the bytes the command writes."""

from __future__ import annotations

from core.errors import UserError
from explore.media import data_url
from explore.views import Request, View, integer, number
from explore.views.collect import MemoryWriter
from testing.generation import TOP_K

MAX_SAMPLES = 64
BATCH = 64  # `generate`'s default --batch-size: the same batches, the same bytes


class PhyloView(View):
    kind = "phylo"

    def __init__(self, tab_id, source, ctx):
        super().__init__(tab_id, source, ctx)
        from testing.generation.commands import family, load_phylo_levels

        _, self.weights = family(source.path)
        self.model, self.levels = load_phylo_levels(self.weights, str(ctx.device))

    def describe(self) -> dict:
        return {**super().describe(), "tree": self.tree(), "n_levels": self.levels.n_levels,
                "cuts": list(self.levels.cuts), "level_names": self.levels.names, "species": list(self.levels.species),
                "max_n": MAX_SAMPLES, "vocab": self.model.autoencoder.quantizer.n_embed, "top_k": TOP_K}  # fmt: skip

    def actions(self) -> dict:
        return {"sample": ("POST", self.sample)}

    def tree(self) -> dict:
        """Nodes in preorder: label, parent, root distance, and the level at which `--node LABEL` samples
        (None for nodes that are a group at no level, which cannot be sampled from)."""
        from datasets.phylogeny import Tree, name_key, node_label, parse_newick

        record = self.model.meta["phylogeny"]
        source = record.get("source", "the checkpoint's tree")  # as levels_from_record reads it
        tree = Tree(parse_newick(record["newick"], source), source, record.get("ranks"))
        finest = {}
        for level, labels in enumerate(self.levels.groups):
            for label in labels:
                finest[name_key(label)] = (
                    level  # later (finer) levels win, as find_node looks from the finest
                )
        index = {id(node): i for i, node in enumerate(tree.nodes)}
        nodes = []
        for node in tree.nodes:
            label = node_label(tree, node)
            nodes.append({"label": label, "name": node.name, "parent": index.get(id(node.parent)),
                          "depth": round(tree.depth(node), 6), "leaf": node.is_leaf,
                          "level": finest.get(name_key(label))})  # fmt: skip
        return {"nodes": nodes}

    def sample(self, request: Request) -> dict:
        """`{"node": label, "level": optional, "n", "seed", "temperature", "top_k"}` -> the node's samples."""
        from testing.generation.commands import check_sampler
        from testing.generation.conditions import check_seed
        from testing.generation.phylo import sample_node

        body = request.json()
        node = str(body.get("node") or "")
        if not node:
            raise UserError("click a node of the tree to sample from it")
        level = (
            None
            if body.get("level") is None
            else integer(body["level"], "level", 0, self.levels.n_levels - 1)
        )
        n = integer(body.get("n", 8), "n", 1, MAX_SAMPLES)
        seed = integer(body.get("seed", 0), "seed", 0, 2**32 - 1)
        check_seed(seed, n)
        temperature = number(body.get("temperature", 1.0), "temperature", 1e-3, 100.0)
        top_k = integer(body.get("top_k", TOP_K), "top_k", 0, self.model.autoencoder.quantizer.n_embed)
        check_sampler(temperature, top_k)
        found_level, group = self.levels.find_node(node, level)

        def work():
            writer = MemoryWriter()
            sample_node(
                self.model, self.levels, writer, found_level, group, n, seed, temperature, top_k, BATCH
            )
            return writer

        writer = self.ctx.worker.run(self.slot(request, "sample"), work)
        label = self.levels.groups[found_level][group]
        command = (f"python main.py generate phylo -c {self.source.path} --node '{label}' --level {found_level} "
                   f"--n {n} --seed {seed}" + (f" --temperature {temperature:g}" if temperature != 1 else "")
                   + (f" --top-k {top_k}" if top_k != TOP_K else ""))  # fmt: skip
        return {"node": label, "level": found_level, "n_levels": self.levels.n_levels,
                "cut": self.levels.cuts[found_level] if found_level < len(self.levels.cuts) else 1.0,
                "caption": writer.items[0]["row_label"], "species": writer.items[0]["condition"]["species"],
                "images": [data_url(item["png"]) for item in writer.items],
                "seeds": [item["seed"] for item in writer.items], "command": command}  # fmt: skip
