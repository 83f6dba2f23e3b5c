"""`secateur plan`: from a target to a recipe, the Pareto front and a plot."""

from __future__ import annotations

import argparse

from secateur.commands.flags import nonfinite_argument, option_flags


def add(sub: argparse._SubParsersAction) -> None:
    from secateur.plan import PlanConfig
    from secateur.schema import options_of

    p = sub.add_parser("plan", help="from a target (decode speedup in an engine, parameters, file size) to the best "
                                    "mix of depth, width and hidden pruning: a recipe, the Pareto front and a plot")
    p.add_argument("model", help="HF model directory, .gguf file or secateur output (never modified)")
    p.add_argument("--out", required=True, help="new directory for plan.toml, front.md, pareto.png and plan.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    nonfinite_argument(p)
    option_flags(p, {k: (o, o.help) for k, o in options_of(PlanConfig).items()})
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from secateur.errors import ConfigError
    from secateur.plan import PlanConfig, plan
    from secateur.schema import from_flags

    if args.target is None:
        raise ConfigError("--target is required, e.g. --target decode-speedup=1.6, params=80M, file=200MB or draft")
    record = plan(args.model, from_flags(PlanConfig, vars(args)), args.out, overwrite=args.overwrite,
                  allow_nonfinite=args.allow_nonfinite,
                  explicit=frozenset(k for k, v in vars(args).items() if v is not None))  # fmt: skip
    chosen, costs = record["chosen"], record["costs"]
    print(f"plan for --target {record['target']}: {chosen['key']} ({chosen['kind']}), {chosen['params'] / 1e6:.1f}M "
          f"parameters, KL {chosen['kl']:.4f} on {chosen['windows']} windows")
    if record["metric"] == "draft":
        check = chosen["check"]
        print(f"  as the draft of the model in {costs['engine']['engine']}: measured {check['speedup']:.2f}x with "
              f"{check['draft_tokens']} proposals per round (acceptance {check['acceptance']:.3f}, output "
              f"{'identical' if check['identical'] else 'NOT identical'}); predicted best: {chosen['draft_tokens']} "
              f"per round, {chosen['draft_speedup']:.2f}x (acceptance on the model's continuations "
              f"{chosen['agree']:.3f}); {len(costs['checks'])} runs")
        if check["speedup"] < 1:
            print(f"  no draft of the grid decodes faster than the model alone in this engine on this machine "
                  f"(best measured {check['speedup']:.2f}x)")
    elif costs.get("engine"):
        errors = [abs(e[k]) for e in costs["errors"] for k in ("decode", "prefill")]
        print(f"  {'timed against dense' if chosen['measured'] else 'predicted'} in {costs['engine']['engine']}: "
              f"decode {chosen['decode_speedup']:.2f}x, prefill {chosen['prefill_speedup']:.2f}x; cost model "
              f"held-out error up to {max(errors, default=0) * 100:.1f}% ({len(costs['errors'])} shapes); "
              f"{len(costs['checks'])} shapes checked in pairs (margin {costs['margin'] * 100:.1f}%)")
    seconds = record["seconds"]
    print(f"  {record['evaluations']} candidate builds over rungs {record['rungs']}"
          f"{'; ' + record['stopped'] if record['stopped'] else ''}; {seconds['total']:.0f} s")
    print(f"-> {args.out}/plan.toml (secateur prune MODEL --recipe {args.out}/plan.toml --out DIR), front.md, "
          "pareto.png, plan.json")
    return 0
