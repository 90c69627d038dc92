from orpo_cli.cli import main

main()
