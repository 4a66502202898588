from polyprune.cli import main

main()
