"""``python -m fastcnn.zoo [MODEL ...] [--markdown]``: parameters, MACs and activation
size of zoo models (the README's model table is ``--markdown``)."""
from .model_summary import summary


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fastcnn.zoo",
                                     description="Parameters, MACs and activation size of zoo models.")
    parser.add_argument("models", nargs="*", help="model names (default: the whole zoo)")
    parser.add_argument("--markdown", action="store_true", help="print the README's markdown table")
    args = parser.parse_args(argv)
    from .model_summary import zoo_table
    from .registry import create_model, model_info

    if args.markdown:
        print(zoo_table(args.models or None))
        return
    from .registry import list_models

    for name in args.models or list_models():
        try:
            info = model_info(name)
        except ValueError as e:
            parser.exit(2, f"error: {e}\n")
        summary(create_model(name), input_size=info.input_size)


if __name__ == "__main__":
    main()
